""" CNT specifics: compute matched to TNT, TNT equivalence, weight conversion, position encodings, errors. """
import logging

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.resnet import BasicBlock

from timm_hybrid import count_flops
from timm_hybrid.models.cnt import CNT, InnerConv, checkpoint_filter_fn

TNT_OF_CNT = {'cnt_ti_patch16_224': 'tnt_ti_patch16_224', 'cnt_s_patch16_224': 'tnt_s_patch16_224',
              'cnt_b_patch16_224': 'tnt_b_patch16_224'}


def _randomize(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """ Random values everywhere (norm affines and biases too), so a mis-mapped tensor cannot hide. """
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def _small_cnt(**kwargs) -> CNT:
    return CNT(**dict(dict(img_size=32, patch_size=16, embed_dim=32, inner_dim=8, depth=2, num_heads=2,
                           num_classes=5), **kwargs))


@pytest.mark.parametrize('cnt_name', sorted(TNT_OF_CNT))
def test_sizes_match_tnt_compute(cnt_name):
    cnt, tnt = count_flops(cnt_name), count_flops(TNT_OF_CNT[cnt_name])
    assert cnt.gmacs <= tnt.gmacs, f'{cnt_name}: {cnt.gmacs:.3f} GMACs > TNT {tnt.gmacs:.3f}'
    assert abs(cnt.params / tnt.params - 1) <= 0.05, f'{cnt_name}: {cnt.mparams:.2f}M vs TNT {tnt.mparams:.2f}M'
    assert not cnt.unsupported


def test_attn_inner_block_is_tnt():
    """ cnt_s with TNT's inner transformer and inner width loads timm's TNT-S and gives its logits. """
    tnt = _randomize(timm.create_model('tnt_s_patch16_224')).eval()
    cnt = timm.create_model('cnt_s_patch16_224', inner_block='attn', inner_dim=24).eval()
    cnt.load_state_dict(checkpoint_filter_fn(tnt.state_dict(), cnt), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, actual = tnt(x), cnt(x)
    assert expected.abs().max() > 0.1  # not a trivially small output
    max_diff = (actual - expected).abs().max().item()
    print(f'TNT-S vs CNT-S(attn) max abs logit diff: {max_diff:.2e}')  # shown with pytest -s
    assert max_diff < 1e-4


def test_tnt_weights_into_conv_cnt_take_outer_keep_inner_init(caplog):
    tnt = _randomize(timm.create_model('tnt_s_patch16_224', img_size=64))
    tnt_sd = tnt.state_dict()
    cnt = timm.create_model('cnt_s_patch16_224', img_size=64, inner_dim=24, num_classes=10)
    fresh = {k: v.clone() for k, v in cnt.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger='timm_hybrid.models.cnt'):
        converted = checkpoint_filter_fn(tnt_sd, cnt)
    cnt.load_state_dict(converted, strict=True)
    loaded = cnt.state_dict()
    qkv = torch.cat([tnt_sd['blocks.3.attn_out.qk.weight'], tnt_sd['blocks.3.attn_out.v.weight']])
    assert torch.equal(loaded['blocks.3.outer.attn.qkv.weight'], qkv)
    for cnt_key, tnt_key in (('blocks.3.outer.mlp.fc1.weight', 'blocks.3.mlp.fc1.weight'),
                             ('blocks.3.proj.weight', 'blocks.3.proj.weight'),
                             ('pixel_embed.proj.weight', 'pixel_embed.proj.weight'),
                             ('patch_pos', 'patch_pos'), ('cls_token', 'cls_token'), ('norm.bias', 'norm.bias')):
        assert torch.equal(loaded[cnt_key], tnt_sd[tnt_key]), cnt_key
    for k in ('blocks.3.inner.conv_block.conv1.weight', 'blocks.3.inner.conv_block.bn2.weight', 'head.weight'):
        assert torch.equal(loaded[k], fresh[k]), k
    log = caplog.text
    assert 'blocks.*.inner.attn.qkv.weight: no such tensor in this model (x12)' in log
    assert 'head.weight: shape (1000, 384) != model (10, 384)' in log
    assert 'keep their fresh initialisation' in log and 'blocks.*.inner.conv_block.conv1.weight (x12)' in log


def test_cnt_checkpoint_at_224_loads_at_384_with_resampled_position_embedding(tmp_path):
    src = _randomize(timm.create_model('cnt_ti_patch16_224')).state_dict()
    path = tmp_path / 'cnt_ti_224.pth'
    torch.save(src, path)
    model = timm.create_model(
        'cnt_ti_patch16_224', img_size=384, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    loaded = model.state_dict()
    assert loaded['patch_pos'].shape == (1, 1 + 24 * 24, 192)
    expected = resample_abs_pos_embed(src['patch_pos'], new_size=[24, 24], num_prefix_tokens=1)
    torch.testing.assert_close(loaded['patch_pos'], expected)
    assert all(torch.equal(loaded[k], v) for k, v in src.items() if k != 'patch_pos')
    assert model(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def test_state_dict_that_does_not_fit_names_the_keys():
    model = _small_cnt()
    sd = model.state_dict()
    del sd['blocks.1.outer.attn.qkv.weight']
    sd['blocks.1.outer.extra'] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r'blocks\.1\.outer\.attn\.qkv\.weight[\s\S]*blocks\.1\.outer\.extra'):
        model.load_state_dict(checkpoint_filter_fn(sd, model))
    with pytest.raises(ValueError, match=r"not a CNT, timm TNT or timm DeiT/ViT state dict.*'conv1\.weight'"):
        checkpoint_filter_fn({'conv1.weight': torch.zeros(1), 'fc.weight': torch.zeros(1)}, model)


@pytest.mark.parametrize('training', [True, False])
def test_inner_conv_on_tokens_equals_resnet_block_on_nchw(training):
    """ The copy-free channels-last view of the pixel tokens gives the plain NCHW ResNet block's result. """
    block = BasicBlock(12, 12)
    with torch.no_grad():
        for bn in (block.bn1, block.bn2):
            bn.weight.normal_(1, 0.2), bn.bias.normal_(0, 0.2)
            bn.running_mean.normal_(0, 0.2), bn.running_var.uniform_(0.5, 1.5)
    inner = InnerConv(block, (4, 4)).train(training)
    tokens = torch.randn(6, 16, 12)
    reference = block(tokens.transpose(1, 2).reshape(6, 12, 4, 4).contiguous())
    actual = inner(tokens.clone())
    torch.testing.assert_close(actual, reference.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_fused_attention_matches_unfused():
    model = _randomize(_small_cnt(inner_block='attn'), std=0.1).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        for m in model.modules():
            if hasattr(m, 'fused_attn'):
                m.fused_attn = False
        plain = model(x)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_distilled_outputs_follow_deit_contract():
    model = timm.create_model('cnt_nano_distilled_patch7_28').train()
    x = torch.randn(4, 1, 28, 28)
    averaged = model(x)
    model.set_distilled_training(True)
    cls_logits, dist_logits = model(x)
    assert cls_logits.shape == dist_logits.shape == (4, 10)
    torch.testing.assert_close(averaged, (cls_logits + dist_logits) / 2)
    assert not torch.allclose(cls_logits, dist_logits)
    model.eval()
    assert model(x).shape == (4, 10)  # eval always averages
    assert model.patch_pos.shape[1] == 2 + 16


@pytest.mark.parametrize('patch_pos', ['learned', 'sincos', 'none'])
@pytest.mark.parametrize('pixel_pos', ['learned', 'sincos', 'none'])
def test_position_encoding_options(patch_pos, pixel_pos):
    model = _small_cnt(patch_pos_embed=patch_pos, pixel_pos_embed=pixel_pos)
    state = model.state_dict()
    for name, kind in (('patch_pos', patch_pos), ('pixel_pos', pixel_pos)):
        value = getattr(model, name)
        assert (name in state) == (kind == 'learned')  # fixed sin-cos is rebuilt, not stored
        assert (value is None) == (kind == 'none')
        assert isinstance(value, torch.nn.Parameter) == (kind == 'learned')
    if patch_pos == 'sincos':
        assert torch.equal(model.patch_pos[:, 0], torch.zeros(1, 32))  # class token: no position
        assert model.patch_pos[:, 1:].abs().sum() > 0
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_position_encodings_change_the_output():
    x = torch.randn(1, 3, 32, 32)
    outputs = []
    for kind in ('sincos', 'none'):
        torch.manual_seed(0)
        model = _small_cnt(patch_pos_embed=kind, pixel_pos_embed=kind).eval()
        with torch.no_grad():
            outputs.append(model(x))
    assert not torch.allclose(outputs[0], outputs[1])


@pytest.mark.parametrize('inner_block', ['basic', 'bottleneck', 'attn'])
def test_any_multiple_of_patch_size(inner_block):
    model = _small_cnt(img_size=(48, 80), inner_block=inner_block).eval()
    assert model(torch.randn(2, 3, 48, 80)).shape == (2, 5)
    maps = model.forward_intermediates(torch.randn(1, 3, 48, 80), indices=1, intermediates_only=True)
    assert maps[0].shape == (1, 32, 3, 5)


def test_bad_input_gets_a_clear_error():
    model = _small_cnt()
    with pytest.raises(AssertionError, match='4D image batch'):
        model(torch.randn(3, 32, 32))
    with pytest.raises(AssertionError, match='Input has 1 channels, the model was built for in_chans=3'):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(AssertionError, match=r'Input height 48 does not match the model \(32\).*img_size'):
        model(torch.randn(1, 3, 48, 32))
    with pytest.raises(ValueError, match='must be a \\(non-zero\\) multiple of patch_size'):
        _small_cnt(img_size=40)
    with pytest.raises(ValueError, match="Unknown inner_block 'transformer', expected one of"):
        _small_cnt(inner_block='transformer')
    with pytest.raises(ValueError, match="Unknown patch_pos type 'fixed'"):
        _small_cnt(patch_pos_embed='fixed')
    with pytest.raises(ValueError, match='needs inner_dim divisible by 4'):
        _small_cnt(inner_block='bottleneck', inner_dim=6)


def test_zero_init_last_starts_inner_blocks_near_identity():
    model = _small_cnt()
    for m in model.modules():
        if isinstance(m, InnerConv):
            assert torch.count_nonzero(m.conv_block.bn2.weight) == 0
    model = _small_cnt(zero_init_last=False)
    assert all(torch.count_nonzero(m.conv_block.bn2.weight) > 0 for m in model.modules() if isinstance(m, InnerConv))
