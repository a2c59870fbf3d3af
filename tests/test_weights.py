""" The committed weights/<arch>.fmnist folders load offline and reproduce the accuracy on their cards. """
import json
from pathlib import Path

import pytest
import timm

from timm_hybrid.data import DEBIAN_FASHION_MNIST_DIR, evaluate_fashion_mnist, prepare_fashion_mnist

FOLDERS = sorted((Path(__file__).resolve().parents[1] / 'weights').glob('*.fmnist'))


@pytest.fixture(scope='module')
def fashion_mnist_root(tmp_path_factory):
    if not DEBIAN_FASHION_MNIST_DIR.exists():
        pytest.skip('Debian dataset-fashion-mnist not installed')
    root = tmp_path_factory.mktemp('fm')
    prepare_fashion_mnist(root)
    return root


def test_weights_are_published():
    assert FOLDERS, 'no weights/<arch>.fmnist folder committed'


@pytest.mark.parametrize('folder', FOLDERS, ids=[f.name for f in FOLDERS])
def test_folder_loads_and_reproduces_card_accuracy(folder, fashion_mnist_root):
    results = json.loads((folder / 'eval_results.json').read_text())
    config = json.loads((folder / 'config.json').read_text())
    assert f'{config["architecture"]}.{config["pretrained_cfg"]["tag"]}' == folder.name
    assert f'top1 (test split): {results["top1"]:.2f} %' in (folder / 'README.md').read_text()
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    measured = evaluate_fashion_mnist(model, fashion_mnist_root)
    assert measured['top1'] == pytest.approx(results['top1'], abs=0.02)
    assert measured['top5'] == pytest.approx(results['top5'], abs=0.02)
