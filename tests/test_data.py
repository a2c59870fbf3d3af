""" Fashion-MNIST laid out for timm's torch/fashion_mnist dataset, offline. """
import gzip

import numpy as np
import pytest
import timm.data
from torchvision.datasets import FashionMNIST

from timm_hybrid.cli import main
from timm_hybrid.data import DEBIAN_FASHION_MNIST_DIR, FashionMNISTMissing, prepare_fashion_mnist


def _write_idx(path, array: np.ndarray) -> None:
    magic = (0x08 << 8) | array.ndim  # unsigned byte data
    header = magic.to_bytes(4, 'big') + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def source(tmp_path):
    """ A miniature Fashion-MNIST in the Debian package's format: 100 train / 20 test images, 10 per class. """
    rng = np.random.default_rng(0)
    src = tmp_path / 'src'
    src.mkdir()
    for split, n in (('train', 100), ('t10k', 20)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, (n, 28, 28))
        images[:, 0, 0] = labels  # the label, written into a pixel, to check images and labels stay paired
        _write_idx(src / f'{split}-images-idx3-ubyte.gz', images)
        _write_idx(src / f'{split}-labels-idx1-ubyte.gz', labels)
    return src


def test_layout_is_read_by_timm_torch_dataset(source, tmp_path):
    counts = prepare_fashion_mnist(tmp_path / 'root', source=source)
    assert counts == {'train': 100, 'test': 20, 'validation': 0}
    ds = timm.data.create_dataset('torch/fashion_mnist', root=str(tmp_path / 'root'), split='validation')
    assert len(ds) == 20
    image, label = ds[13]
    assert image.size == (28, 28) and label == 3 and image.getpixel((0, 0)) == 3


def test_train_fraction_is_class_balanced_and_paired(source, tmp_path):
    counts = prepare_fashion_mnist(tmp_path / 'root', source=source, train_fraction=0.3, seed=1)
    assert counts == {'train': 30, 'test': 20, 'validation': 0}
    ds = FashionMNIST(str(tmp_path / 'root'), train=True)
    assert np.bincount(ds.targets.numpy(), minlength=10).tolist() == [3] * 10
    assert (ds.data[:, 0, 0] == ds.targets).all()
    again = prepare_fashion_mnist(tmp_path / 'again', source=source, train_fraction=0.3, seed=1)
    assert again == counts and (FashionMNIST(str(tmp_path / 'again'), train=True).data == ds.data).all()


def _images(root, train: bool) -> set:
    """ The layout's train or test images, each as bytes (the fixture's images are random, so each one is unique). """
    ds = FashionMNIST(str(root), train=train)
    return {bytes(image.numpy().tobytes()) for image in ds.data}


@pytest.mark.parametrize('fraction', [None, 1.0, 0.5])
def test_validation_split_is_disjoint_balanced_and_fixed(source, tmp_path, fraction):
    layouts = {}
    for eval_split in ('validation', 'test'):
        layouts[eval_split] = tmp_path / eval_split
        counts = prepare_fashion_mnist(layouts[eval_split], source=source, train_fraction=fraction, seed=3,
                                       validation_per_class=2, eval_split=eval_split)
        assert counts == {'train': 40 if fraction == 0.5 else 80, 'validation': 20, 'test': 20}
    validation = FashionMNIST(str(layouts['validation']), train=False)
    assert np.bincount(validation.targets.numpy(), minlength=10).tolist() == [2] * 10
    assert (validation.data[:, 0, 0] == validation.targets).all()  # images and labels stay paired
    train = FashionMNIST(str(layouts['validation']), train=True)
    assert np.bincount(train.targets.numpy(), minlength=10).tolist() == [4 if fraction == 0.5 else 8] * 10
    # the validation images are training-set images that the training files do not hold
    prepare_fashion_mnist(tmp_path / 'whole', source=source)
    assert _images(layouts['validation'], train=False) < _images(tmp_path / 'whole', train=True)
    assert not _images(layouts['validation'], train=False) & _images(layouts['validation'], train=True)
    # both layouts train on the same images; the test layout's test files are the real test set
    assert _images(layouts['validation'], train=True) == _images(layouts['test'], train=True)
    assert _images(layouts['test'], train=False) == _images(tmp_path / 'whole', train=False)


def test_validation_split_does_not_depend_on_the_subset_seed(source, tmp_path):
    draws = [prepare_fashion_mnist(tmp_path / f's{seed}', source=source, train_fraction=0.5, seed=seed,
                                   validation_per_class=2, eval_split='validation') for seed in (0, 1)]
    assert draws[0] == draws[1]
    assert _images(tmp_path / 's0', train=False) == _images(tmp_path / 's1', train=False)
    assert _images(tmp_path / 's0', train=True) != _images(tmp_path / 's1', train=True)


def test_eval_split_needs_a_validation_split(source, tmp_path):
    with pytest.raises(ValueError, match='validation_per_class'):
        prepare_fashion_mnist(tmp_path / 'root', source=source, eval_split='validation')
    with pytest.raises(ValueError, match="one of \\('test', 'validation'\\)"):
        prepare_fashion_mnist(tmp_path / 'root', source=source, eval_split='val')


def test_missing_source_says_which_package(tmp_path, capsys):
    with pytest.raises(FashionMNISTMissing, match='apt-get install dataset-fashion-mnist'):
        prepare_fashion_mnist(tmp_path / 'root', source=tmp_path / 'nowhere')
    assert main(['data', 'fashion-mnist', '--root', str(tmp_path / 'r'), '--source', str(tmp_path / 'x')]) == 2
    assert 'dataset-fashion-mnist' in capsys.readouterr().err


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.exists(), reason='Debian dataset-fashion-mnist not installed')
def test_debian_package_gives_the_real_data_set(tmp_path):
    assert main(['data', 'fashion-mnist', '--root', str(tmp_path)]) == 0
    ds = FashionMNIST(str(tmp_path), train=False)
    assert len(ds) == 10000 and np.bincount(ds.targets.numpy()).tolist() == [1000] * 10
