""" The weight folders in timm_hybrid/weights/ ship in the wheel, their `.fmnist` tags load them offline from the
installed package, and they reproduce the accuracy on their cards. """
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import setuptools
import timm
import torch

from timm_hybrid.data import DEBIAN_FASHION_MNIST_DIR, evaluate_fashion_mnist, prepare_fashion_mnist
from timm_hybrid.hub import card_accuracy
from timm_hybrid.models.baselines import PACKAGED_WEIGHTS_DIR
from timm_hybrid.models.hybrids import HOSTS

REPO = Path(__file__).resolve().parents[1]
FOLDERS = sorted(PACKAGED_WEIGHTS_DIR.glob('*.fmnist'))
FMNIST_TAGS = timm.list_pretrained('*.fmnist')
# what a wheel build reads: the rest of the checkout (benchmarks, tests, results) is not part of the package
SOURCE_FILES = ('pyproject.toml', 'README.md', 'LICENSE', 'model_cards', 'timm_hybrid')

# Run by the installed package's interpreter, outside the source tree (see the script's docstring).
CHECK_INSTALLED = Path(__file__).with_name('installed_weights_check.py')


def test_weights_are_published():
    """ The nano study's five folders; the micro study's join them as `fmnist_micro_study.py publish` writes them
    (each then checked like these). """
    nano = {f.name for f in FOLDERS if '_nano_' in f.name}
    assert nano == {f'{arch}_patch7_28.fmnist' for arch in (
        'cnt_nano', 'tnt_nano', 'deit_nano', 'cnt_nano_distilled', 'deit_nano_distilled')}, nano
    assert all('_micro_' in f.name for f in FOLDERS if f.name not in nano)


def _weights_tag(tag: str) -> str:
    """ The tag whose weights `tag` loads: its own, or for a registered hybrid its host's. """
    arch, name = tag.split('.', 1)
    return f'{HOSTS[arch][0]}.{name}' if arch in HOSTS else tag


@pytest.mark.parametrize('tag', FMNIST_TAGS)
def test_tag_names_its_packaged_file_and_hub_copy_or_no_source(tag):
    cfg = timm.get_pretrained_cfg(tag).to_dict()
    folder = PACKAGED_WEIGHTS_DIR / _weights_tag(tag)
    if folder.is_dir():
        assert cfg['file'] == str(folder / 'model.safetensors') and Path(cfg['file']).is_file()
        assert cfg['hf_hub_id'] == f'timm-hybrid/{_weights_tag(tag)}'
    else:  # no weights anywhere: the tag must not send timm to a file, hub repo or URL that does not exist
        assert not (cfg.get('file') or cfg.get('hf_hub_id') or cfg.get('url')), cfg
        with pytest.raises(RuntimeError, match='No pretrained weights exist'):
            timm.create_model(tag, pretrained=True)


def test_every_folder_has_a_tag():
    assert {f.name for f in FOLDERS} <= set(FMNIST_TAGS)


@pytest.fixture
def offline(monkeypatch):
    """ HF_HUB_OFFLINE, and any attempt to open a connection fails the test. """
    import socket

    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f'network access attempted: {args}')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)


@pytest.mark.parametrize('folder', FOLDERS, ids=[f.name for f in FOLDERS])
def test_tag_loads_the_committed_weights_offline(folder, offline):
    model = timm.create_model(folder.name, pretrained=True).eval()
    reference = timm.create_model(folder.name.split('.')[0]).eval()
    reference.load_state_dict(safetensors.torch.load_file(folder / 'model.safetensors'))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def _pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, '-m', 'pip', *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.skipif(int(setuptools.__version__.split('.')[0]) < 77,
                    reason='the offline wheel build (--no-build-isolation) needs setuptools>=77 here, '
                           'as pyproject says')
def test_wheel_ships_the_weights_and_tags_load_from_the_installed_package(tmp_path):
    """ Built from a copy of the sources (no stale build/ of the checkout), installed into a folder of its own, then
    imported outside the source tree with HF_HUB_OFFLINE=1 and no network. """
    source = tmp_path / 'source'
    source.mkdir()
    for name in SOURCE_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns('__pycache__'))
        else:
            shutil.copyfile(REPO / name, source / name)
    _pip('wheel', '.', '--no-deps', '--no-build-isolation', '--no-index', '-q', '-w', str(tmp_path / 'dist'),
         cwd=source)
    wheel, = (tmp_path / 'dist').glob('timm_hybrid-*.whl')
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in FOLDERS:
        for file in folder.iterdir():
            assert f'timm_hybrid/weights/{folder.name}/{file.name}' in names
    assert 'timm_hybrid/py.typed' in names and any(n.endswith('.dist-info/licenses/LICENSE') for n in names)

    site = tmp_path / 'site'
    _pip('install', '--no-deps', '--no-index', '-q', '--target', str(site), str(wheel), cwd=tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, str(CHECK_INSTALLED), str(PACKAGED_WEIGHTS_DIR), str(site)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == [w for f in FOLDERS for w in ('ok', f.name)]


@pytest.fixture(scope='module')
def fashion_mnist_root(tmp_path_factory):
    if not DEBIAN_FASHION_MNIST_DIR.exists():
        pytest.skip('Debian dataset-fashion-mnist not installed')
    root = tmp_path_factory.mktemp('fm')
    prepare_fashion_mnist(root)
    return root


@pytest.mark.parametrize('folder', FOLDERS, ids=[f.name for f in FOLDERS])
def test_folder_loads_and_reproduces_card_accuracy(folder, fashion_mnist_root):
    """ The accuracy in the card's model-index (and its text) is what timm's evaluator measures on the folder. """
    reported = card_accuracy(folder / 'README.md')
    config = json.loads((folder / 'config.json').read_text())
    assert f'{config["architecture"]}.{config["pretrained_cfg"]["tag"]}' == folder.name
    assert f'top1 (test split): {reported["top1"]:.2f} %' in (folder / 'README.md').read_text()
    assert not (folder / 'eval_results.json').exists()  # the model-index holds the results
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    measured = evaluate_fashion_mnist(model, fashion_mnist_root)
    assert measured['top1'] == pytest.approx(reported['top1'], abs=0.02)
    assert measured['top5'] == pytest.approx(reported['top5'], abs=0.02)


# --- official weights: TransCNN / HAT-Net from their release urls, Refiner-ViT from a file downloaded by hand ---------

@pytest.fixture
def unreachable(monkeypatch, tmp_path):
    """ No network (every connection refused, as on a machine without one) and an empty download cache. """
    import socket

    def refuse(*args, **kwargs):
        raise OSError(101, 'Network is unreachable')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'torch_hub'))
    return tmp_path / 'torch_hub' / 'checkpoints'


# small widths: the error comes before any tensor is loaded
TINY_TRANSCNN = dict(embed_dims=(8, 8, 8, 8), depths=(1, 1, 1, 1), head_dim=8)


@pytest.mark.parametrize('tag, kwargs, says', [
    ('transcnn_tiny.in1k', TINY_TRANSCNN, 'the official release file https://github.com/yun-liu/HAT-Net/releases/'
                                          'download/v1.0/TransCNN-Tiny.pth, which could not be downloaded (URLError'),
    ('hatnet_tiny.in1k', TINY_TRANSCNN, 'HAT-Net/releases/download/v2.0/HAT-Net_Tiny.pth, which could not be'),
    ('refiner_vit_large_patch16_448.in1k', dict(depth=2, embed_dim=32, num_heads=2),
     'the official weights have no address timm can download from'),
])
def test_official_weights_unreachable_say_where_from_and_what_to_do_offline(tag, kwargs, says, unreachable):
    from timm_hybrid.models import PretrainedWeightsUnavailable
    with pytest.raises(PretrainedWeightsUnavailable) as e:
        timm.create_model(tag, pretrained=True, **kwargs)
    message = str(e.value)
    assert message.startswith(f'{tag}: ') and says in message
    assert f'Official release: {timm.get_pretrained_cfg(tag).origin_url}' in message
    assert f"timm.create_model('{tag}', pretrained=True, pretrained_cfg_overlay=dict(file='PATH/TO/" in message
    if timm.get_pretrained_cfg(tag).url:  # a file put in timm's download cache loads as if downloaded
        assert f'or put it at {unreachable / Path(timm.get_pretrained_cfg(tag).url).name} ' in message
    with pytest.raises(PretrainedWeightsUnavailable, match=r'the weights file /absent\.pth .* does not exist'):
        timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(file='/absent.pth'), **kwargs)


@pytest.mark.parametrize('family', ['transcnn', 'hatnet', 'refiner'])
def test_synthetic_official_checkpoints_have_the_official_key_layout(family):
    """ tests/official_checkpoints.py (the synthetic checkpoints the publish tests convert) reproduces the official
    code's state dict (tests/fixtures/) key for key and shape for shape, the filter's unused tensors included, and
    the filter maps it back onto the model. """
    from official_checkpoints import FIXTURES, OFFICIAL_FIXTURES, fixture_model, official_state_dict
    model = fixture_model(family)
    synthetic = official_state_dict(model)
    official = safetensors.torch.load_file(FIXTURES / OFFICIAL_FIXTURES[family][0])
    assert synthetic.keys() == official.keys()
    assert all(synthetic[k].shape == official[k].shape for k in official)
    converted = OFFICIAL_FIXTURES[family][2](dict(synthetic), model)
    assert converted.keys() == model.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())
    # a full-size model of the family (the released one's aux head included) maps to the official key shapes
    full = timm.create_model(OFFICIAL_FIXTURES[family][1], **(dict(aux_head=True) if family == 'refiner' else {}))
    official_shapes = {re.sub(r'\d+', '#', k) for k in official}
    assert {re.sub(r'\d+', '#', k) for k in official_state_dict(full)} == official_shapes
