""" Fashion-MNIST for timm's `--dataset torch/fashion_mnist`, offline.

Debian's `dataset-fashion-mnist` package ships the four gzipped IDX files. torchvision's FashionMNIST (which timm's
`torch/fashion_mnist` dataset is) reads the uncompressed files from `<root>/FashionMNIST/raw/`, so laying them out
there lets timm's train.py / validate.py run with `--data-dir <root>` and no download.

A fixed, class-balanced fraction of the training set can be written instead (the small-data study): the test set is
always complete.
"""
import gzip
import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch

__all__ = ['DEBIAN_FASHION_MNIST_DIR', 'FashionMNISTMissing', 'evaluate_fashion_mnist', 'prepare_fashion_mnist']

DEBIAN_FASHION_MNIST_DIR = Path('/usr/share/datasets/fashion-mnist')
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


def _subset_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """ The same `fraction` of every class, drawn with `seed`, in the original order. """
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.choice(idx, size=max(1, round(len(idx) * fraction)), replace=False))
    return np.sort(np.concatenate(keep))


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
) -> Dict[str, int]:
    """ Writes `<root>/FashionMNIST/raw/*-ubyte` for torchvision / timm, and returns the number of items per split.

    Args:
        root: Folder to pass to timm as `--data-dir`.
        source: Folder with the (gzipped or plain) IDX files; Debian's package by default.
        train_fraction: Keep only this class-balanced fraction of the training set (e.g. 0.1).
        seed: Seed of the subset draw.
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

    raw_dir = Path(root) / 'FashionMNIST' / 'raw'
    raw_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ('train', 'test'):
        images, labels = _read_idx(found[f'{split}_images']), _read_idx(found[f'{split}_labels'])
        n = int.from_bytes(labels[4:8], 'big')
        if split == 'train' and train_fraction is not None and train_fraction < 1:
            label_array = np.frombuffer(labels, dtype=np.uint8, offset=_IDX_HEADER_BYTES['labels'])
            keep = _subset_indices(label_array, train_fraction, seed)
            _write_idx_subset(images, 'images', keep, raw_dir / _FILES['train_images'])
            _write_idx_subset(labels, 'labels', keep, raw_dir / _FILES['train_labels'])
            n = len(keep)
        else:
            for key, data in ((f'{split}_images', images), (f'{split}_labels', labels)):
                (raw_dir / _FILES[key]).write_bytes(data)
        counts[split] = n
    # torchvision < 0.9 cached a processed/ copy; remove any stale one so the raw files are what gets read
    shutil.rmtree(Path(root) / 'FashionMNIST' / 'processed', ignore_errors=True)
    return counts


@torch.inference_mode()
def evaluate_fashion_mnist(
        model: torch.nn.Module, root: Union[str, os.PathLike], batch_size: int = 128) -> Dict[str, float]:
    """ Test-set top-1 / top-5 (%) of `model` on Fashion-MNIST laid out at `root`, through timm's own data config
    (the model's pretrained cfg: size, crop, mean / std) and eval transforms, as a user of the weights would. """
    import timm.data
    config = timm.data.resolve_data_config({}, model=model)
    dataset = timm.data.create_dataset('torch/fashion_mnist', root=str(root), split='validation')
    loader = timm.data.create_loader(
        dataset, input_size=config['input_size'], batch_size=batch_size, is_training=False, use_prefetcher=False,
        interpolation=config['interpolation'], mean=config['mean'], std=config['std'], crop_pct=config['crop_pct'],
        crop_mode=config.get('crop_mode'), num_workers=0)
    model.eval()
    correct1 = correct5 = 0
    for images, targets in loader:
        top5 = model(images).topk(5, dim=1).indices
        correct1 += (top5[:, 0] == targets).sum().item()
        correct5 += (top5 == targets[:, None]).any(dim=1).sum().item()
    return {'top1': 100 * correct1 / len(dataset), 'top5': 100 * correct5 / len(dataset)}
