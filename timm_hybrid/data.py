""" Fashion-MNIST for timm's `--dataset torch/fashion_mnist`, offline.

Debian's `dataset-fashion-mnist` package ships the four gzipped IDX files. torchvision's FashionMNIST (which timm's
`torch/fashion_mnist` dataset is) reads the uncompressed files from `<root>/FashionMNIST/raw/`, so laying them out
there lets timm's train.py / validate.py run with `--data-dir <root>` and no download.

A fixed, class-balanced fraction of the training set can be written instead (the small-data study). For choosing a
recipe without reading the test set, a fixed class-balanced validation split is carved from the training set
(`validation_per_class`): it is drawn with its own fixed seed, so it is the same in every layout, and the training
images (and any fraction of them) are drawn from what remains. The layout's test files then hold either the real test
set or the validation images (`eval_split`), so timm's `--val-split test` reads the one asked for, and a model trained
in one layout is evaluated on the other with identical training files.

The data set's constants live here, once: the other modules (pretrained cfgs, hub cards, the study) import them.
"""
import gzip
import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch

__all__ = [
    'DEBIAN_FASHION_MNIST_DIR', 'FASHION_MNIST_DATASET', 'FASHION_MNIST_INPUT_SIZE', 'FASHION_MNIST_LABEL_NAMES',
    'FASHION_MNIST_MEAN', 'FASHION_MNIST_NUM_CLASSES', 'FASHION_MNIST_SIZES', 'FASHION_MNIST_STD', 'VALIDATION_SEED',
    'FashionMNISTMissing', 'evaluate_fashion_mnist', 'prepare_fashion_mnist',
]

DEBIAN_FASHION_MNIST_DIR = Path('/usr/share/datasets/fashion-mnist')
# (name in model cards, Hugging Face dataset id, paper id)
FASHION_MNIST_DATASET = ('Fashion-MNIST', 'zalando-datasets/fashion_mnist', 'arXiv:1708.07747')
FASHION_MNIST_INPUT_SIZE = (1, 28, 28)
FASHION_MNIST_NUM_CLASSES = 10
FASHION_MNIST_SIZES = {'train': 60000, 'test': 10000}
FASHION_MNIST_LABEL_NAMES = (
    't-shirt/top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'ankle boot')
# train-set statistics of the [0, 1] pixel values
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
# the validation split is one fixed draw, whatever seed draws the training fraction
VALIDATION_SEED = 12345
EVAL_SPLITS = ('test', 'validation')
_FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}
_IDX_HEADER_BYTES = {'images': 16, 'labels': 8}  # magic + dims, big-endian int32 each


class FashionMNISTMissing(FileNotFoundError):
    """ The Fashion-MNIST source files are not there (Debian package not installed). """


def _read_idx(path: Path) -> bytes:
    with gzip.open(path, 'rb') if path.suffix == '.gz' else open(path, 'rb') as f:
        return f.read()


def _subset_indices(
        labels: np.ndarray, fraction: float, seed: int, exclude: Optional[np.ndarray] = None) -> np.ndarray:
    """ The same `fraction` of every class (of what `exclude` leaves), drawn with `seed`, in the original order. """
    rng = np.random.default_rng(seed)
    pool = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        pool[exclude] = False
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero((labels == c) & pool)
        keep.append(rng.choice(idx, size=max(1, round(len(idx) * fraction)), replace=False))
    return np.sort(np.concatenate(keep))


def _validation_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    """ The fixed validation split: `per_class` images of every class, drawn with VALIDATION_SEED. """
    rng = np.random.default_rng(VALIDATION_SEED)
    return np.sort(np.concatenate([
        rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in np.unique(labels)]))


def _write_idx_subset(raw: bytes, kind: str, indices: np.ndarray, path: Path) -> None:
    header = bytearray(raw[:_IDX_HEADER_BYTES[kind]])
    header[4:8] = int(len(indices)).to_bytes(4, 'big')  # first dim = number of items
    item_bytes = (len(raw) - len(header)) // int.from_bytes(raw[4:8], 'big')
    items = np.frombuffer(raw, dtype=np.uint8, offset=len(header)).reshape(-1, item_bytes)
    path.write_bytes(bytes(header) + items[indices].tobytes())


def prepare_fashion_mnist(
        root: Union[str, os.PathLike],
        source: Union[str, os.PathLike] = DEBIAN_FASHION_MNIST_DIR,
        train_fraction: Optional[float] = None,
        seed: int = 0,
        validation_per_class: int = 0,
        eval_split: str = 'test',
) -> Dict[str, int]:
    """ Writes `<root>/FashionMNIST/raw/*-ubyte` for torchvision / timm, and returns the number of items per split.

    Args:
        root: Folder to pass to timm as `--data-dir`.
        source: Folder with the (gzipped or plain) IDX files; Debian's package by default.
        train_fraction: Keep only this class-balanced fraction of the training set (e.g. 0.1); with a validation
            split, of the training images it leaves.
        seed: Seed of the subset draw.
        validation_per_class: Carve a fixed validation split of this many images per class out of the training set
            (0: none; the training set stays complete).
        eval_split: What the layout's test files hold: 'test' (the real test set) or 'validation' (the carved
            validation split; needs validation_per_class).

    Returns:
        {'train': training images, 'test': images in the test files (validation images for eval_split='validation'),
        'validation': validation images carved out (0 if none)}.
    """
    source = Path(source)
    found = {}
    for key, name in _FILES.items():
        candidates = [source / f'{name}.gz', source / name]
        found[key] = next((p for p in candidates if p.exists()), None)
    missing = [_FILES[k] for k, v in found.items() if v is None]
    if missing:
        raise FashionMNISTMissing(
            f'Fashion-MNIST files {missing} not found in {source}. On Debian / Ubuntu: '
            f'`apt-get install dataset-fashion-mnist` (installs them to {DEBIAN_FASHION_MNIST_DIR}), or pass the '
            f'folder holding the IDX files.')
    if train_fraction is not None and not 0 < train_fraction <= 1:
        raise ValueError(f'train_fraction must be in (0, 1], got {train_fraction}.')
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"eval_split must be one of {EVAL_SPLITS}, got '{eval_split}'.")
    if eval_split == 'validation' and validation_per_class <= 0:
        raise ValueError("eval_split='validation' needs a validation split: set validation_per_class > 0.")

    raw_dir = Path(root) / 'FashionMNIST' / 'raw'
    raw_dir.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = _read_idx(found['train_images']), _read_idx(found['train_labels'])
    label_array = np.frombuffer(train_labels, dtype=np.uint8, offset=_IDX_HEADER_BYTES['labels'])
    validation = _validation_indices(label_array, validation_per_class) if validation_per_class > 0 else None
    if train_fraction is not None and train_fraction < 1:
        train = _subset_indices(label_array, train_fraction, seed, exclude=validation)
    elif validation is not None:
        train = np.setdiff1d(np.arange(len(label_array)), validation)
    else:
        train = None  # the complete training set, copied as is
    if eval_split == 'validation':
        test = (train_images, train_labels, validation)
    else:
        test = (_read_idx(found['test_images']), _read_idx(found['test_labels']), None)
    counts = {'validation': 0 if validation is None else len(validation)}
    for split, (images, labels, indices) in (('train', (train_images, train_labels, train)), ('test', test)):
        for kind, data in (('images', images), ('labels', labels)):
            path = raw_dir / _FILES[f'{split}_{kind}']
            if indices is None:
                path.write_bytes(data)
            else:
                _write_idx_subset(data, kind, indices, path)
        counts[split] = int.from_bytes(labels[4:8], 'big') if indices is None else len(indices)
    # torchvision < 0.9 cached a processed/ copy; remove any stale one so the raw files are what gets read
    shutil.rmtree(Path(root) / 'FashionMNIST' / 'processed', ignore_errors=True)
    return counts


@torch.inference_mode()
def evaluate_fashion_mnist(
        model: torch.nn.Module, root: Union[str, os.PathLike], batch_size: int = 128) -> Dict[str, float]:
    """ Test-set loss, top-1 and top-5 (%) of `model` on Fashion-MNIST laid out at `root`, as timm's validate.py
    measures them (the model's data config and eval transforms, timm's `ClassificationEvaluator`; its `top1` /
    `top5` are validate.py's columns), in one process without timm's scripts. """
    import timm.data
    from timm.task import ClassificationEvaluator
    config = timm.data.resolve_data_config({}, model=model)
    dataset = timm.data.create_dataset('torch/fashion_mnist', root=str(root), split='validation')
    loader = timm.data.create_loader(
        dataset, input_size=config['input_size'], batch_size=batch_size, is_training=False, use_prefetcher=False,
        interpolation=config['interpolation'], mean=config['mean'], std=config['std'], crop_pct=config['crop_pct'],
        crop_mode=config.get('crop_mode'), num_workers=0)
    model.eval()
    evaluator = ClassificationEvaluator()
    for images, targets in loader:
        evaluator.update(model(images), targets)
    return dict(evaluator.compute())
