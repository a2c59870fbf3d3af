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
    assert counts == {'train': 100, 'test': 20}
    ds = timm.data.create_dataset('torch/fashion_mnist', root=str(tmp_path / 'root'), split='validation')
    assert len(ds) == 20
    image, label = ds[13]
    assert image.size == (28, 28) and label == 3 and image.getpixel((0, 0)) == 3


def test_train_fraction_is_class_balanced_and_paired(source, tmp_path):
    counts = prepare_fashion_mnist(tmp_path / 'root', source=source, train_fraction=0.3, seed=1)
    assert counts == {'train': 30, 'test': 20}
    ds = FashionMNIST(str(tmp_path / 'root'), train=True)
    assert np.bincount(ds.targets.numpy(), minlength=10).tolist() == [3] * 10
    assert (ds.data[:, 0, 0] == ds.targets).all()
    again = prepare_fashion_mnist(tmp_path / 'again', source=source, train_fraction=0.3, seed=1)
    assert again == counts and (FashionMNIST(str(tmp_path / 'again'), train=True).data == ds.data).all()


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
