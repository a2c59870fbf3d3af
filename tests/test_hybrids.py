""" timm_hybrid.models.hybrids: the registered hosts-with-a-layer, through timm's own builder and pretrained path. """
import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

from test_weights import offline  # noqa: F401  a fixture: HF_HUB_OFFLINE, any connection fails the test
from timm_hybrid import count_flops
from timm_hybrid.compare import compare_models
from timm_hybrid.layers import HMHSA, ConvolvedTNTBlock, RefinedAttention, inserted_state_keys
from timm_hybrid.models.hybrids import HOSTS

LAYER_NAMES = ('_hmhsa', '_refined', '_cnt')


def _small(name: str) -> dict:
    """ Create kwargs and input of a model at a small size (64 px where its default is larger). """
    size = timm.models.get_pretrained_cfg(name).input_size
    if size[-1] <= 64:
        return dict(kwargs={}, input_size=tuple(size))
    token_model = HOSTS[name][1].__name__ != 'add_hmhsa' if name in HOSTS else 'patch' in name
    return dict(kwargs=dict(img_size=64) if token_model else {}, input_size=(size[0], 64, 64))


@pytest.mark.parametrize('name', sorted(HOSTS))
def test_named_as_its_host_with_the_layer_after_the_architecture(name):
    host, insert, prefix, _ = HOSTS[name]
    layer = next(n for n in LAYER_NAMES if n in name)
    assert name.replace(layer, '', 1) == host and timm.is_model(name) and timm.is_model(host)
    assert prefix.rstrip('_') in {'_hmhsa': 'hmhsa', '_refined': 'refine', '_cnt': 'cnt'}[layer]


@pytest.mark.parametrize('name', sorted(HOSTS))
def test_pretrained_cfgs_are_the_hosts_tag_for_tag(name):
    host = HOSTS[name][0]
    tags = {n.split('.', 1)[1] for n in timm.list_models(name, include_tags=True) if '.' in n}
    assert tags == {n.split('.', 1)[1] for n in timm.list_models(host, include_tags=True) if '.' in n}
    assert timm.models.get_pretrained_cfg(name).tag == timm.models.get_pretrained_cfg(host).tag  # the same default
    for tag in tags:
        cfg = timm.models.get_pretrained_cfg(f'{name}.{tag}').to_dict()
        host_cfg = timm.models.get_pretrained_cfg(f'{host}.{tag}').to_dict()
        assert cfg['architecture'] == name and cfg['tag'] == tag
        assert any(note.startswith(f'Weights of the host, {host}.{tag};') for note in cfg['notes'])
        different = {k for k in cfg.keys() | host_cfg.keys() if cfg.get(k) != host_cfg.get(k)}
        assert different <= {'architecture', 'notes', 'origin_url'}, different  # hf_hub_id, file, url: the host's


# registered hybrid -> create kwargs of it and its host, input (C, H, W)
LOADED = {
    'resnet18_hmhsa': ({}, (3, 72, 56)),
    'convnext_atto_hmhsa': ({}, (3, 64, 64)),
    'efficientnet_b0_hmhsa': ({}, (3, 64, 64)),
    'deit_tiny_refined_patch16_224': (dict(img_size=64), (3, 64, 64)),
    'deit_nano_refined_patch7_28': ({}, (1, 28, 28)),
    'tnt_s_cnt_patch16_224': (dict(img_size=64), (3, 64, 64)),
    'tnt_nano_cnt_patch7_28': ({}, (1, 28, 28)),
}


def _host_file(name: str, tmp_path, **kwargs):
    """ Random host weights in a safetensors file (as a downloaded checkpoint), and the host loaded from it. """
    host = HOSTS[name][0]
    weights = timm.create_model(host, **LOADED[name][0], **kwargs)
    save_file(weights.state_dict(), tmp_path / 'model.safetensors')
    overlay = dict(file=str(tmp_path / 'model.safetensors'))
    return overlay, timm.create_model(host, pretrained=True, pretrained_cfg_overlay=overlay, **LOADED[name][0])


@pytest.mark.parametrize('name', sorted(LOADED))
@pytest.mark.usefixtures('offline')
def test_pretrained_loads_the_host_weights_offline_with_the_hosts_logits(name, tmp_path, caplog):
    overlay, host = _host_file(name, tmp_path)
    with caplog.at_level(logging.WARNING, logger='timm_hybrid.models.hybrids'):
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **LOADED[name][0])
    assert 'start as the identity' in caplog.text  # the new layers say where they come from
    x = torch.randn(2, *LOADED[name][1])
    with torch.no_grad():
        assert (model.eval()(x) - host.eval()(x)).abs().max() < 1e-5
    # timm's adaptations of a pretrained load work on the host's keys: new head, one input channel
    adapted = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=5, in_chans=1,
                                **LOADED[name][0])
    host_adapted = timm.create_model(HOSTS[name][0], pretrained=True, pretrained_cfg_overlay=overlay, num_classes=5,
                                     in_chans=1, **LOADED[name][0])
    host_adapted.get_classifier().load_state_dict(adapted.get_classifier().state_dict())
    with torch.no_grad():
        assert (adapted.eval()(x[:, :1]) - host_adapted.eval()(x[:, :1])).abs().max() < 1e-5


@pytest.mark.parametrize('tag', ['deit_nano_refined_patch7_28.fmnist', 'tnt_nano_cnt_patch7_28.fmnist'])
@pytest.mark.usefixtures('offline')
def test_packaged_host_weights_load_offline_through_the_hybrid_tag(tag):
    model = timm.create_model(tag, pretrained=True).eval()
    host = timm.create_model(f'{HOSTS[tag.split(".")[0]][0]}.fmnist', pretrained=True).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert (model(x) - host(x)).abs().max() < 1e-5


@pytest.mark.usefixtures('offline')
def test_a_hybrid_checkpoint_loads_back_with_its_own_layers(tmp_path, caplog):
    model = timm.create_model('resnet18_hmhsa').eval()
    with torch.no_grad():
        model.layer4.hmhsa.attn.proj.weight.normal_()
    save_file(model.state_dict(), tmp_path / 'model.safetensors')
    with caplog.at_level(logging.WARNING, logger='timm_hybrid.models.hybrids'):
        loaded = timm.create_model('resnet18_hmhsa', pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(tmp_path / 'model.safetensors'))).eval()
    assert 'start as the identity' not in caplog.text
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_checkpoint_of_another_host_is_refused(tmp_path):
    save_file(timm.create_model('deit_tiny_patch16_224').state_dict(), tmp_path / 'model.safetensors')
    with pytest.raises(ValueError, match='a timm ViT / DeiT checkpoint, of which'):
        timm.create_model('resnet18_hmhsa', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'model.safetensors')))


@pytest.mark.parametrize('name', sorted(LOADED))
@pytest.mark.usefixtures('offline')
def test_features_only_as_the_host(name, tmp_path):
    """ The host's feature wrapper and levels; at insertion the host's maps. """
    overlay, _ = _host_file(name, tmp_path)
    kwargs = dict(features_only=True, pretrained=True, pretrained_cfg_overlay=overlay, **LOADED[name][0])
    features = timm.create_model(name, **kwargs).eval()
    host_features = timm.create_model(HOSTS[name][0], **kwargs).eval()
    assert features.feature_info.channels() == host_features.feature_info.channels()
    assert features.feature_info.reduction() == host_features.feature_info.reduction()
    x = torch.randn(1, *LOADED[name][1])
    with torch.no_grad():
        maps, host_maps = features(x), host_features(x)
    assert len(maps) == len(host_maps) and all((m - h).abs().max() < 1e-5 for m, h in zip(maps, host_maps))


def test_create_model_options_reach_the_insertion():
    model = timm.create_model('resnet18_hmhsa', hmhsa_stages=(1, 2), hmhsa_window_size=4, num_classes=3)
    assert [n for n, m in model.named_modules() if isinstance(m, HMHSA)] == ['layer1.hmhsa', 'layer2.hmhsa']
    assert model.layer1.hmhsa.attn.window_size == 4 and model.num_classes == 3
    model = timm.create_model('deit_tiny_refined_patch16_224', img_size=32, refine_blocks=(0, -1))
    assert [type(b.attn) is RefinedAttention for b in model.blocks] == [True] + [False] * 10 + [True]
    model = timm.create_model('tnt_nano_cnt_patch7_28', cnt_blocks=(0,), cnt_bottleneck=True)
    assert type(model.blocks[0]) is ConvolvedTNTBlock and type(model.blocks[1]) is not ConvolvedTNTBlock
    assert type(model.blocks[0].inner_conv.conv_block).__name__ == 'Bottleneck'
    with pytest.raises(TypeError, match='window'):
        timm.create_model('resnet18_hmhsa', hmhsa_windows=4)


@pytest.mark.parametrize('name', sorted(HOSTS))
def test_flops_of_the_hybrid_counted_and_above_the_host(name):
    small = _small(name)
    hybrid = count_flops(name, input_size=small['input_size'], **small['kwargs'])  # strict: every op counted
    host = count_flops(HOSTS[name][0], input_size=small['input_size'], **small['kwargs'])
    assert hybrid.gmacs > host.gmacs and hybrid.params > host.params
    assert inserted_state_keys(timm.create_model(name, **small['kwargs']))


def test_compare_rows_for_a_hybrid_and_its_host(tmp_path):
    rows = compare_models(['deit_nano_refined_patch7_28', 'deit_nano_patch7_28'], output_dir=str(tmp_path),
                          speed=False, memory=False)
    by_model = {r['model']: r for r in rows}
    assert by_model['deit_nano_refined_patch7_28']['infer_gmacs'] > by_model['deit_nano_patch7_28']['infer_gmacs']
    assert (tmp_path / 'compare.md').read_text().count('deit_nano') >= 2
