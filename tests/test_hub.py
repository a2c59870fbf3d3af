""" timm_hybrid.hub: export a training checkpoint, load it back offline through timm's own loaders, push, card. """
import argparse
import hashlib
import json
import shutil
import socket
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub.file_download import repo_folder_name

from timm_hybrid import count_flops, hub

ARCH = 'cnt_nano_patch7_28'
REPO_ID = f'timm-hybrid/{ARCH}.fmnist'


def save_train_checkpoint(model: torch.nn.Module, path: Path, ema: bool = False) -> Path:
    """ The layout timm's train.py (CheckpointSaver) writes: DDP `module.` keys, args Namespace, optimizer. """
    state_dict = {f'module.{k}': v for k, v in model.state_dict().items()}
    checkpoint = {'epoch': 0, 'arch': type(model).__name__, 'state_dict': state_dict, 'version': 2,
                  'args': argparse.Namespace(model=ARCH, lr=1e-3), 'optimizer': {'state': {}, 'param_groups': []}}
    if ema:
        # timm's EMA averages the floating-point tensors and copies the rest (num_batches_tracked, token_grid)
        checkpoint['state_dict_ema'] = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """ A random-weight nano CNT (BN running stats moved off their init) and its timm training checkpoint. """
    torch.manual_seed(0)
    model = timm.create_model(ARCH).train()
    with torch.no_grad():
        model(torch.randn(8, 1, 28, 28))  # BN running stats become non-trivial buffers worth round-tripping
    model.eval()
    return model, save_train_checkpoint(model, tmp_path_factory.mktemp('train') / 'model_best.pth.tar')


@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory):
    model, checkpoint = trained
    folder = hub.export(ARCH, checkpoint, tmp_path_factory.mktemp('export') / f'{ARCH}.fmnist',
                        card_data=dict(accuracy={'top1': 85.25}, train_command='python train.py --model ' + ARCH))
    return model, folder


@pytest.fixture
def no_network(monkeypatch):
    """ Any attempt to open a connection fails the test. """
    def refuse(*args, **kwargs):
        raise AssertionError(f'network access attempted: {args}')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)


def install_in_hub_cache(folder: Path, repo_id: str, cache_dir: Path) -> Path:
    """ Lays out `folder` as huggingface_hub's cache holds a downloaded repo: content-addressed blobs, a snapshot of
    relative symlinks per commit, refs/main naming the commit. """
    repo_dir = cache_dir / repo_folder_name(repo_id=repo_id, repo_type='model')
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo_dir / 'snapshots' / commit
    (repo_dir / 'blobs').mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo_dir / 'blobs' / blob)
        (snapshot / file.name).symlink_to(Path('..', '..', 'blobs', blob))
    (repo_dir / 'refs').mkdir()
    (repo_dir / 'refs' / 'main').write_text(commit)
    return snapshot


def test_export_writes_timm_hub_folder(exported):
    model, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == ARCH and config['num_classes'] == 10
    assert config['label_names'][0] == 't-shirt/top' and len(config['label_names']) == 10
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [1, 28, 28] and cfg['mean'] == [0.286] and cfg['std'] == [0.353]
    assert cfg['crop_pct'] == 1.0 and cfg['license'] == 'apache-2.0' and cfg['paper_ids'] == 'arXiv:2103.00112'
    assert config['model_args']['in_chans'] == 1
    weights = safetensors.torch.load_file(folder / 'model.safetensors')
    reference = model.state_dict()
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def test_model_card_layout(exported):
    _, folder = exported
    card = (folder / 'README.md').read_text()
    assert '{{' not in card and '{%' not in card and '$' not in card.split('## Citation')[0], 'unfilled template field'
    for section in ('## Model Details', '### Image Classification', '### Feature Map Extraction',
                    '### Image Embeddings', '## Training', '## Model Comparison', '## Citation'):
        assert section in card
    assert 'pip install timm-hybrid' in card and 'import timm_hybrid' in card
    assert f"timm.create_model('hf-hub:{REPO_ID}', pretrained=True)" in card
    assert 'Fashion-MNIST' in card and 'TimmWrapperModel' in card
    assert 'top1 (test split): 85.25 %' in card and 'python train.py --model cnt_nano_patch7_28' in card
    for paper in ('2103.00112', '2012.12877', '1708.07747'):
        assert paper in card.split('## Citation')[1]
    flops = count_flops(ARCH, input_size=(1, 28, 28))
    assert f'| **{ARCH}.fmnist** (this model) | 85.25 |  | {flops.mparams:.3f} | {flops.gmacs:.4f} |' in card


def test_model_card_metadata_is_the_hubs(exported):
    """ The card's YAML is huggingface_hub's ModelCardData: what the Hub indexes (library, pipeline, license, data
    set) and the accuracy as its model-index, read back with `card_accuracy`. """
    _, folder = exported
    data = huggingface_hub.ModelCard.load(folder / 'README.md').data
    assert (data.library_name, data.pipeline_tag, data.license) == ('timm', 'image-classification', 'apache-2.0')
    assert data.datasets == ['zalando-datasets/fashion_mnist'] and 'timm' in data.tags
    assert data.base_model is None  # not a distilled student
    result, = data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_split, result.metric_type, result.metric_value) == (
        'image-classification', 'zalando-datasets/fashion_mnist', 'test', 'accuracy', 85.25)
    assert hub.card_accuracy(folder / 'README.md') == {'top1': 85.25}


def test_distilled_student_card_names_its_teacher_as_base_model():
    torch.manual_seed(0)
    student = timm.create_model('cnt_nano_distilled_patch7_28.fmnist').eval()
    card = hub.render_model_card(student, dict(teacher='timm-hybrid/resnet18.fmnist', accuracy={'top1': 80.0,
                                                                                                'top5': 99.0}))
    assert card.data.base_model == 'timm-hybrid/resnet18.fmnist'
    assert 'Distilled from:** [timm-hybrid/resnet18.fmnist]' in str(card)
    assert hub.card_accuracy(card) == {'top1': 80.0, 'top5': 99.0}


def test_official_tag_card_has_origin_license_and_papers():
    """ A converted official checkpoint's card: the release it came from, its license as recorded, its paper. """
    model = timm.create_model('hatnet_tiny.in1k', embed_dims=(8, 8, 8, 8), depths=(1, 1, 1, 1), head_dim=8,
                              num_classes=5).eval()
    card = hub.render_model_card(model, dict(accuracy={'top1': 79.8}))
    text = str(card)
    assert '- **Original:** https://github.com/yun-liu/HAT-Net' in text and '2106.03180' in text
    assert card.data.license == 'unknown' and card.data.datasets == ['imagenet-1k']
    assert card.data.eval_results[0].dataset_name == 'ImageNet-1k'


def test_offline_hub_cache_tag_and_local_dir_load_bit_identical(exported, tmp_path, monkeypatch, no_network):
    model, folder = exported
    cache_dir = tmp_path / 'hub_cache'
    install_in_hub_cache(folder, REPO_ID, cache_dir)
    # huggingface_hub reads these at import time: set the environment for child processes and the constants here
    monkeypatch.setenv('HF_HUB_CACHE', str(cache_dir))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache_dir))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)

    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        for name in (f'hf-hub:{REPO_ID}', f'local-dir:{folder}'):
            loaded = timm.create_model(name, pretrained=True).eval()
            assert type(loaded) is type(model)
            assert torch.equal(loaded(x), expected), name
        assert loaded.pretrained_cfg['label_names'][-1] == 'ankle boot'
        # the plain tag takes its cfg's `file` (the weights in the package) before its hf_hub_id: not this cache
        tagged = timm.create_model(f'{ARCH}.fmnist', pretrained=True).eval()
        assert not torch.equal(tagged(x), expected)
        assert tagged.pretrained_cfg['hf_hub_id'] == REPO_ID


def test_export_takes_ema_weights_on_request(trained, tmp_path):
    model, _ = trained
    checkpoint = save_train_checkpoint(model, tmp_path / 'ema.pth.tar', ema=True)
    folder = hub.export(ARCH, checkpoint, tmp_path / 'ema', use_ema=True)
    weights = safetensors.torch.load_file(folder / 'model.safetensors')
    assert torch.equal(weights['head.weight'], model.head.weight + 1)


def test_export_reads_safetensors(trained, tmp_path):
    model, _ = trained
    path = tmp_path / 'weights.safetensors'
    safetensors.torch.save_file(model.state_dict(), path)
    folder = hub.export(ARCH, path, tmp_path / 'out')
    assert torch.equal(safetensors.torch.load_file(folder / 'model.safetensors')['head.bias'], model.head.bias)


def test_export_mismatch_names_the_keys(trained, tmp_path):
    _, checkpoint = trained
    with pytest.raises(hub.ExportError) as e:
        hub.export('tnt_nano_patch7_28', checkpoint, tmp_path / 'out')
    assert 'missing keys: ' in str(e.value) and 'unexpected keys: ' in str(e.value)
    assert 'blocks.*.outer.attn.qkv.weight (x6)' in str(e.value) and 'blocks.*.attn_in.qk.weight (x6)' in str(e.value)
    with pytest.raises(hub.ExportError, match=r'shape mismatch: head.weight \(10, 64\) \(model \(5, 64\)\)'):
        hub.export(ARCH, checkpoint, tmp_path / 'out', num_classes=5)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('suffix', ['.pth.tar', '.safetensors'])
def test_export_truncated_file_is_a_clear_error(trained, tmp_path, suffix):
    model, checkpoint = trained
    path = tmp_path / f'broken{suffix}'
    if suffix == '.safetensors':
        safetensors.torch.save_file(model.state_dict(), path)
    else:
        shutil.copyfile(checkpoint, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(hub.ExportError, match='truncated or corrupted'):
        hub.export(ARCH, path, tmp_path / 'out')
    with pytest.raises(hub.ExportError, match='does not exist'):
        hub.export(ARCH, tmp_path / 'absent.pth', tmp_path / 'out')


@pytest.fixture
def no_hf_token(monkeypatch, tmp_path):
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.delenv('HUGGING_FACE_HUB_TOKEN', raising=False)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_TOKEN_PATH', str(tmp_path / 'no_token'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_STORED_TOKENS_PATH', str(tmp_path / 'no_tokens'))


def test_push_without_token_says_how_to_get_one(exported, no_hf_token, no_network):
    _, folder = exported
    with pytest.raises(hub.HubTokenMissing, match='HF_TOKEN'):
        hub.push(folder, REPO_ID)


def test_push_uploads_the_folder_with_huggingface_hub(exported, monkeypatch, no_hf_token, no_network):
    _, folder = exported
    calls = []

    class RepoUrl(str):
        repo_id = REPO_ID

    monkeypatch.setattr(huggingface_hub.HfApi, 'whoami', lambda self: {'name': 'tester'})
    monkeypatch.setattr(huggingface_hub.HfApi, 'repo_exists', lambda self, repo_id: False)
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo',
                        lambda self, repo_id, **kw: calls.append(('create_repo', repo_id, kw)) or RepoUrl())
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder',
                        lambda self, **kw: calls.append(('upload_folder', self.token, kw)) or 'commit')
    monkeypatch.setenv('HF_TOKEN', 'hf_test')
    assert hub.push(folder, REPO_ID, private=True) == 'commit'
    assert calls[0] == ('create_repo', REPO_ID, {'private': True, 'exist_ok': True})
    assert calls[1][:2] == ('upload_folder', 'hf_test') and calls[1][2]['folder_path'] == str(folder)


def test_push_refuses_a_folder_that_is_not_an_export(tmp_path):
    with pytest.raises(FileNotFoundError, match='timm-hybrid export'):
        hub.push(tmp_path, REPO_ID, token='hf_test')


@pytest.mark.parametrize('data_config, input_size, mean', [
    ({}, [1, 224, 224], [pytest.approx(0.449, abs=1e-3)]),  # resnet18's RGB cfg reduced to one channel
    (dict(input_size=(1, 28, 28), mean=(0.286,), std=(0.353,), crop_pct=1.0), [1, 28, 28], [0.286]),
])
def test_export_of_a_cnn_with_other_channels_and_data_config(tmp_path, data_config, input_size, mean):
    """ The study's teacher: timm's resnet18 trained on 1-channel 28 px images. config.json must describe that input
    (not resnet18's 3x224x224 RGB cfg), the card renders, and the folder loads back with timm's data config. """
    torch.manual_seed(0)
    teacher = timm.create_model('resnet18', num_classes=10, in_chans=1).eval()
    checkpoint = tmp_path / 'model_best.pth.tar'
    torch.save({'epoch': 0, 'state_dict': teacher.state_dict()}, checkpoint)
    folder = hub.export('resnet18', checkpoint, tmp_path / 'teacher', num_classes=10, in_chans=1,
                        data_config=data_config)
    cfg = json.loads((folder / 'config.json').read_text())['pretrained_cfg']
    assert cfg['input_size'] == input_size and cfg['mean'] == mean and len(cfg['std']) == 1
    # resnet18's cfg evaluates at 288 px: kept (1 channel) with its own preprocessing, dropped with another input size
    assert cfg.get('test_input_size') == ([1, 288, 288] if not data_config else None)
    assert 'resnet18' in (folder / 'README.md').read_text()
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    config = timm.data.resolve_data_config(model=loaded)
    assert config['input_size'] == tuple(input_size)
    x = torch.randn(2, *input_size)
    torch.testing.assert_close(loaded(x), teacher(x), rtol=0, atol=0)


def test_cli_export_takes_train_py_data_flags(trained, tmp_path):
    from timm_hybrid.cli import main
    _, checkpoint = trained
    out = tmp_path / 'out'
    assert main(['export', ARCH, '--checkpoint', str(checkpoint), '--output', str(out), '--mean', '0.5',
                 '--std', '0.25', '--crop-pct', '0.9']) == 0
    cfg = json.loads((out / 'config.json').read_text())['pretrained_cfg']
    assert (cfg['mean'], cfg['std'], cfg['crop_pct'], cfg['input_size']) == ([0.5], [0.25], 0.9, [1, 28, 28])


def test_cli_export_with_model_kwargs_reloads_equal_and_card_counts_its_size(tmp_path):
    """ The README's `--model-kwargs img_size=56`: config.json records it, `local-dir:` re-builds the 56 px model
    with the same logits, and the card's size and GMACs are the exported model's, not its source cfg's 28 px. """
    from timm_hybrid.cli import main
    torch.manual_seed(0)
    model = timm.create_model(ARCH, img_size=56).eval()
    checkpoint = save_train_checkpoint(model, tmp_path / 'model_best.pth.tar')
    out = tmp_path / f'{ARCH}.fmnist'
    assert main(['export', f'{ARCH}.fmnist', '--checkpoint', str(checkpoint), '--output', str(out),
                 '--model-kwargs', 'img_size=56']) == 0
    config = json.loads((out / 'config.json').read_text())
    assert config['model_args']['img_size'] == [56, 56] and config['pretrained_cfg']['input_size'] == [1, 56, 56]
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 1, 56, 56)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    card = (out / 'README.md').read_text()
    assert 'Image size: 56 x 56, 1 channel' in card
    assert f'{count_flops(model).gmacs:.4f} (fvcore' in card


# --- publish ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def empty_download_cache(tmp_path, monkeypatch):
    """ timm's url downloads (torch.hub's checkpoints folder) go to an empty folder of the test. """
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'torch_hub'))
    return tmp_path / 'torch_hub' / 'checkpoints'


@pytest.fixture
def mocked_hf_api(monkeypatch, no_hf_token):
    """ HfApi's create_repo / upload_folder recorded instead of sent (whoami / repo_exists answered). """
    calls = []

    class RepoUrl(str):
        def __new__(cls, repo_id):
            url = super().__new__(cls, f'https://huggingface.co/{repo_id}')
            url.repo_id = repo_id
            return url

    def upload_folder(self, **kw):
        files = sorted(p.name for p in Path(kw['folder_path']).iterdir())
        calls.append(('upload_folder', self.token, kw['repo_id'], files))
        return f'commit of {kw["repo_id"]}'

    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo',
                        lambda self, repo_id, **kw: calls.append(('create_repo', repo_id, kw)) or RepoUrl(repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', upload_folder)
    # push checks the hub first (token, whether the repo exists) and records nothing for that
    monkeypatch.setattr(huggingface_hub.HfApi, 'whoami', lambda self: {'name': 'tester'})
    monkeypatch.setattr(huggingface_hub.HfApi, 'repo_exists', lambda self, repo_id: False)
    return calls


def test_publish_dry_run_lists_every_tag_with_its_source(empty_download_cache, no_network, capsys):
    """ Offline: every packaged folder is copied, re-loaded and checked (equal logits); every official release is
    listed with where to get it. Exit code 0, nothing pushed. """
    from timm_hybrid.cli import main
    from timm_hybrid.models.baselines import PACKAGED_WEIGHTS_DIR
    assert main(['publish', '--dry-run']) == 0
    lines = capsys.readouterr().out.splitlines()
    packaged = sorted(f.name for f in PACKAGED_WEIGHTS_DIR.iterdir() if (f / 'model.safetensors').is_file())
    official = [n for n in timm.list_models(['transcnn_*', 'hatnet_*', 'refiner_*'], include_tags=True) if '.' in n]
    # every packaged folder is what some registered tag loads from, and the reverse (studies add folders over time)
    files = (timm.get_pretrained_cfg(n).file for n in timm.list_models(include_tags=True) if '.' in n)
    loaded_from = sorted({Path(f).parent.name for f in files if f and Path(f).parent.parent == PACKAGED_WEIGHTS_DIR})
    assert packaged == loaded_from and len(packaged) >= 5 and len(official) == 9
    for tag in packaged:
        line, = [x for x in lines if f' {tag} -> timm-hybrid/{tag}, from ' in x]
        assert line.lstrip().startswith('checked') and 'max abs diff 0.00e+00' in line
    for tag in official:
        line, = [x for x in lines if f' {tag} -> timm-hybrid/{tag}, from ' in x]
        assert line.lstrip().startswith('no source')
        assert f'source file not given: download it, then --source {tag}=PATH' in line
        assert 'https://' in line  # the official url, or the page (Refiner-ViT's drive)
    assert lines[-1] == 'dry run: nothing pushed'


def test_publish_converts_official_checkpoints_checks_and_pushes(tmp_path, empty_download_cache, mocked_hf_api,
                                                                 no_network, monkeypatch):
    """ Synthetic official checkpoints (official key layout): TransCNN's in timm's download cache, HAT-Net's given with
    --source. Each is converted by its checkpoint_filter_fn, written as a hub folder whose logits equal the model the
    checkpoint was made from, carded with its origin, license and paper, and pushed through (mocked) HfApi. """
    from official_checkpoints import save_official_checkpoint
    from timm_hybrid.models import official_weights_cache_file
    originals = {}
    for tag in ('transcnn_tiny.in1k', 'hatnet_tiny.in1k'):
        originals[tag] = timm.create_model(tag.split('.')[0]).eval()
    cached = official_weights_cache_file(timm.get_pretrained_cfg('transcnn_tiny.in1k').to_dict())
    cached.parent.mkdir(parents=True)
    official = {'transcnn_tiny.in1k': save_official_checkpoint(originals['transcnn_tiny.in1k'], cached),
                'hatnet_tiny.in1k': save_official_checkpoint(originals['hatnet_tiny.in1k'], tmp_path / 'hat.pth')}
    monkeypatch.setenv('HF_TOKEN', 'hf_test')
    results = hub.publish(tags=list(official), sources={'hatnet_tiny.in1k': tmp_path / 'hat.pth'},
                          output_dir=tmp_path / 'out')
    assert [(r.tag, r.status, r.source) for r in results] == [
        ('hatnet_tiny.in1k', 'pushed', str(tmp_path / 'hat.pth')), ('transcnn_tiny.in1k', 'pushed', str(cached))]
    assert [c[:3] for c in mocked_hf_api] == [
        ('create_repo', 'timm-hybrid/hatnet_tiny.in1k', {'private': False, 'exist_ok': True}),
        ('upload_folder', 'hf_test', 'timm-hybrid/hatnet_tiny.in1k'),
        ('create_repo', 'timm-hybrid/transcnn_tiny.in1k', {'private': False, 'exist_ok': True}),
        ('upload_folder', 'hf_test', 'timm-hybrid/transcnn_tiny.in1k')]
    assert mocked_hf_api[1][3] == ['README.md', 'config.json', 'model.safetensors']
    for result in results:
        assert result.max_abs_diff == 0
        loaded = timm.create_model(f'local-dir:{result.folder}', pretrained=True).eval()
        x = torch.randn(1, *loaded.pretrained_cfg['input_size'])
        with torch.no_grad():  # the filter inverts the official layout exactly: the logits of the original model
            torch.testing.assert_close(loaded(x), originals[result.tag](x), rtol=0, atol=0)
        weights = safetensors.torch.load_file(result.folder / 'model.safetensors')
        assert weights.keys() == originals[result.tag].state_dict().keys()
        card = huggingface_hub.ModelCard.load(result.folder / 'README.md')
        assert card.data.license == 'unknown' and card.data.library_name == 'timm'
        assert '**Original:** https://github.com/yun-liu/HAT-Net' in card.text and '2106.03180' in card.text
    # the same file in timm's download cache is what `pretrained=True` reads offline
    model = timm.create_model('transcnn_tiny.in1k', pretrained=True).eval()
    assert torch.equal(model.stem[0].conv.weight, official['transcnn_tiny.in1k']['patch_embed.0.weight'])


def test_publish_source_errors_are_clear(tmp_path, empty_download_cache, capsys):
    from timm_hybrid.cli import main
    assert main(['publish', '--dry-run', '--tags', 'hatnet_tiny.in1k', '--source',
                 f'hatnet_tiny.in1k={tmp_path / "absent.pth"}']) == 0
    out = capsys.readouterr().out
    assert f'source file {tmp_path / "absent.pth"} not found' in out
    assert main(['publish', '--dry-run', '--tags', 'cnt_s_patch16_224.in1k']) == 2
    assert 'No weights to publish for cnt_s_patch16_224.in1k' in capsys.readouterr().err
    assert main(['publish', '--dry-run', '--source', 'hatnet_tiny.in1k']) == 2
    assert '--source takes TAG=PATH' in capsys.readouterr().err


def test_publish_without_token_stops_before_converting(no_hf_token, capsys):
    from timm_hybrid.cli import main
    assert main(['publish', '--tags', 'cnt_nano_patch7_28.fmnist']) == 2
    assert 'No Hugging Face token to publish with' in capsys.readouterr().err


# --- export is atomic: the target is the previous folder or the new complete one, never a mix ---------------------

def folder_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_export_failing_in_the_card_leaves_the_previous_folder_as_it_was(exported, trained, tmp_path, monkeypatch):
    """ Re-exporting into an existing folder used to write new weights, then fail on the card: old card, new
    weights. A card failure now leaves the previous folder byte for byte, and nothing hidden beside it. """
    _, checkpoint = trained
    folder = tmp_path / 'cnt.fmnist'
    shutil.copytree(exported[1], folder)
    before = folder_bytes(folder)

    def broken_card(model, card_data=None):
        raise ValueError('the card template broke')
    monkeypatch.setattr(hub, 'render_model_card', broken_card)
    with pytest.raises(hub.ExportError, match='Cannot render the model card: ValueError: the card template broke'):
        hub.export(ARCH, checkpoint, folder, overwrite=True, card_data=dict(accuracy={'top1': 99.0}))
    with pytest.raises(hub.ExportError, match='shape mismatch: head.weight'):
        hub.export(ARCH, checkpoint, folder, num_classes=5, overwrite=True)  # a wrong head: before any write
    assert folder_bytes(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['cnt.fmnist']


def test_export_needs_overwrite_for_a_non_empty_folder_and_then_replaces_it_whole(trained, tmp_path):
    _, checkpoint = trained
    folder = tmp_path / 'out'
    folder.mkdir()
    (folder / 'pytorch_model.bin').write_bytes(b'stale weights of another export')
    with pytest.raises(hub.ExportError, match=r'Output folder .* is not empty \(pytorch_model.bin\); pass '
                                              r'overwrite=True \(--overwrite\)'):
        hub.export(ARCH, checkpoint, folder)
    assert (folder / 'pytorch_model.bin').exists()
    hub.export(ARCH, checkpoint, folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    (tmp_path / 'empty').mkdir()
    hub.export(ARCH, checkpoint, tmp_path / 'empty')  # an empty folder needs no overwrite
    with pytest.raises(hub.ExportError, match='is a file, not a folder'):
        hub.export(ARCH, checkpoint, folder / 'README.md')


def test_export_keeps_fp16_and_re_exports_its_own_weights_in_place(trained, tmp_path):
    """ `--checkpoint OUT/model.safetensors --output OUT` overwrote its own input, and fp16 became fp32. """
    model, _ = trained
    half = tmp_path / 'half.safetensors'
    safetensors.torch.save_file(model.half().state_dict(), half)
    model.float()
    folder = hub.export(ARCH, half, tmp_path / 'out', card_data=dict(accuracy={'top1': 10.0}))
    weights = safetensors.torch.load_file(folder / 'model.safetensors')
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}
    reference = safetensors.torch.load_file(half)
    hub.export(ARCH, folder / 'model.safetensors', folder, overwrite=True, card_data=dict(accuracy={'top1': 20.0}))
    again = safetensors.torch.load_file(folder / 'model.safetensors')
    assert again.keys() == reference.keys() and all(torch.equal(again[k], reference[k]) for k in reference)
    assert 'top1 (test split): 20.00 %' in (folder / 'README.md').read_text()
    (folder / 'last.pth.tar').write_bytes((tmp_path / 'half.safetensors').read_bytes())
    with pytest.raises(hub.ExportError, match='lies inside the output folder'):
        hub.export(ARCH, folder / 'last.pth.tar', folder, overwrite=True)


def test_export_card_of_a_shallow_model_lists_its_own_features(tmp_path):
    """ `--model-kwargs depth=2` failed rendering the card: "last-n (3) is out of range (1 to 2)". """
    model = timm.create_model(ARCH, depth=2)
    checkpoint = save_train_checkpoint(model, tmp_path / 'model_best.pth.tar')
    folder = hub.export(ARCH, checkpoint, tmp_path / 'out', model_args=dict(depth=2))
    card = (folder / 'README.md').read_text()
    assert '# e.g.: torch.Size([1, 64, 4, 4]), torch.Size([1, 64, 4, 4])\n' in card
    features = timm.create_model(f'local-dir:{folder}', pretrained=True, features_only=True)
    assert len(features(torch.randn(1, 1, 28, 28))) == 2


KILLED_EXPORT = Path(__file__).with_name('killed_export.py')  # stalls where the test kills it


@pytest.mark.parametrize('stage, previous', [('weights', True), ('card', False)])
def test_export_killed_leaves_the_previous_folder_or_none(stage, previous, exported, trained, tmp_path):
    """ SIGKILL while the weights are written (a previous export in the target) and while the card is rendered
    (no previous folder): the target is the previous folder byte for byte, or absent; the next export completes
    and removes what the killed one left beside the target. """
    import signal
    import subprocess
    import sys
    import time
    _, checkpoint = trained
    folder = tmp_path / f'{ARCH}.fmnist'
    if previous:
        shutil.copytree(exported[1], folder)
    before = folder_bytes(folder) if previous else None
    ready = tmp_path / 'ready'
    argv = ['export', ARCH, '--checkpoint', str(checkpoint), '--output', str(folder), '--overwrite',
            '--accuracy', 'top1=99.5']
    proc = subprocess.Popen([sys.executable, str(KILLED_EXPORT), stage, str(ready), *argv], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else 'no stall'
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    if previous:
        assert folder_bytes(folder) == before
    else:
        assert not folder.exists()
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(f'.{folder.name}.partial-')]
    assert len(left) == 1  # the killed export's hidden folder, never the target
    hub.export(ARCH, checkpoint, folder, overwrite=True, card_data=dict(accuracy={'top1': 99.5}))
    assert sorted(folder_bytes(folder)) == ['README.md', 'config.json', 'model.safetensors']
    assert 'top1 (test split): 99.50 %' in (folder / 'README.md').read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f'.{folder.name}.partial-')]


# --- push: the hub is checked first, a failed upload leaves no empty repo -----------------------------------------

@pytest.fixture
def mocked_hub(monkeypatch, no_hf_token, no_network):
    """ HfApi with recorded calls; `calls['fail']` names the method that raises a connection error. """
    calls = {'made': [], 'fail': None}

    class RepoUrl(str):
        repo_id = REPO_ID

    def method(name, result):
        def call(self, *args, **kwargs):
            calls['made'].append(name)
            if calls['fail'] == name:
                raise ConnectionError(f'{name}: network is unreachable')
            return result
        return call
    for name, result in (('whoami', {'name': 'tester'}), ('repo_exists', False), ('create_repo', RepoUrl()),
                         ('upload_folder', 'commit'), ('delete_repo', None)):
        monkeypatch.setattr(huggingface_hub.HfApi, name, method(name, result))
    monkeypatch.setenv('HF_TOKEN', 'hf_test')
    return calls


def test_push_whose_upload_fails_deletes_the_repo_it_created(exported, mocked_hub):
    mocked_hub['fail'] = 'upload_folder'
    with pytest.raises(hub.PushError, match=r'upload of .* failed \(ConnectionError: upload_folder: network is '
                                            r'unreachable\); check the network .* The repo created for it was deleted'):
        hub.push(exported[1], REPO_ID)
    assert mocked_hub['made'] == ['whoami', 'repo_exists', 'create_repo', 'upload_folder', 'delete_repo']


def test_push_to_an_unreachable_hub_creates_nothing(exported, mocked_hub, capsys):
    from timm_hybrid.cli import main
    mocked_hub['fail'] = 'whoami'
    assert main(['push', str(exported[1]), '--repo-id', REPO_ID]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: cannot reach the Hugging Face Hub')
    assert 'check the network (HF_ENDPOINT, proxies)' in err and 'Nothing was uploaded' in err
    assert mocked_hub['made'] == ['whoami']


def test_push_into_an_existing_repo_that_fails_deletes_nothing(exported, mocked_hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.HfApi, 'repo_exists', lambda self, repo_id: True)
    mocked_hub['fail'] = 'upload_folder'
    with pytest.raises(hub.PushError, match='upload of'):
        hub.push(exported[1], REPO_ID)
    assert mocked_hub['made'] == ['whoami', 'upload_folder']
