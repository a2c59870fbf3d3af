""" CNT specifics: compute matched to TNT, TNT equivalence, weight conversion, position encodings, errors. """
import copy
import logging
from functools import partial

import pytest
import timm
import torch
from timm.layers import Mlp, resample_abs_pos_embed
from timm.utils import reparameterize_model

from conftest import autograd_node_names

from timm_hybrid import count_flops
from timm_hybrid.models import cnt as cnt_module
from timm_hybrid.models._common import ActRecomputingMlp, group_prefix, per_group
from timm_hybrid.models.cnt import (
    CNT, InnerResBlock, batch_norm_pixel_rows, checkpoint_filter_fn, conv3x3_as_matrix, conv3x3_taps)

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
    assert loaded['token_grid'].tolist() == [24, 24]  # the grid the embedding was resampled to
    assert all(torch.equal(loaded[k], v) for k, v in src.items() if k not in ('patch_pos', 'token_grid'))
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


def _trained_like(block: InnerResBlock) -> InnerResBlock:
    """ BatchNorm affines and running stats away from their defaults, so a folding error cannot hide. """
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_(1, 0.2), m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 1.5)
    return block


def test_conv3x3_matrix_is_the_zero_padded_convolution():
    """ Grid flattened (pixel-major, channel-minor) times the matrix == conv2d(padding=1), on a non-square grid. """
    weight = torch.randn(5, 3, 3, 3)
    grid = torch.randn(4, 3, 3, 5)  # (B, C_in, h, w)
    expected = torch.nn.functional.conv2d(grid, weight, padding=1)
    matrix = conv3x3_as_matrix(weight, conv3x3_taps((3, 5)))
    assert matrix.shape == (15 * 3, 15 * 5)
    actual = grid.permute(0, 2, 3, 1).reshape(4, -1) @ matrix
    torch.testing.assert_close(actual.reshape(4, 3, 5, 5).permute(0, 3, 1, 2), expected, atol=1e-5, rtol=1e-5)
    # a corner pixel has 4 taps (5 are padding), the centre of a 3x3 grid all 9
    taps = conv3x3_taps((3, 3))
    assert taps[:, :, 0].sum() == 4 and taps[:, :, 4].sum() == 9


# timm's norm + act layer, with an act that a ReLU after it does not hide
_NORM_ACT = partial(timm.layers.BatchNormAct2d, act_layer=torch.nn.SiLU)


@pytest.mark.parametrize('impl', ['conv', 'matmul'])
@pytest.mark.parametrize('bottleneck', [False, True])
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('dim', [12, 16])  # the GEMM form's CPU training norm: on rows below 16 channels, else aten's
@pytest.mark.parametrize('norm_layer', [torch.nn.BatchNorm2d, _NORM_ACT], ids=['bn', 'bn_act'])
def test_inner_block_implementations_equal_the_plain_resnet_block(impl, bottleneck, training, dim, norm_layer):
    """ Every implementation == timm's ResNet block on the NCHW map: outputs, input and weight gradients, and the
    BatchNorm running stats a training step leaves (fp32, < 1e-5). Drop path is on: the same samples drop. With
    timm's BatchNormAct2d the folded inference forms run the norm's act after its affine. """
    torch.manual_seed(0)
    reference = _trained_like(InnerResBlock(
        dim, (4, 4), drop_path=0.3, bottleneck=bottleneck, impl=impl, norm_layer=norm_layer))
    reference.init_weights(zero_init_last=False)
    block = copy.deepcopy(reference).train(training)
    reference.train(training)
    tokens = torch.randn(6, 16, dim)
    x_ref, x = tokens.clone().requires_grad_(), tokens.clone().requires_grad_()
    torch.manual_seed(1)
    nchw = x_ref.transpose(1, 2).reshape(6, dim, 4, 4)
    expected = reference.conv_block(nchw).flatten(2).transpose(1, 2)
    torch.manual_seed(1)
    actual = block(x)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    actual.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    for (name, p_ref), p in zip(reference.named_parameters(), block.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-5, msg=lambda m: f'{name}: {m}')
    for (name, b_ref), b in zip(reference.named_buffers(), block.buffers()):
        torch.testing.assert_close(b, b_ref, atol=1e-6, rtol=1e-5, msg=lambda m: f'{name}: {m}')
    if not training:
        # without autograd the folded forms add the norm's shift or the shortcut and run the ReLU in one pass; an
        # eval block whose DropPath was set back to training still drops the same samples
        with torch.no_grad():
            torch.testing.assert_close(block(tokens), expected.detach(), atol=1e-5, rtol=1e-5)
            with torch.autocast('cpu', dtype=torch.bfloat16):  # no bf16 kernel for the one-pass add + ReLU
                low = block(tokens)
            torch.testing.assert_close(low.float(), expected.detach(), atol=5e-2 * expected.abs().max().item(), rtol=0)
            block.conv_block.drop_path.train()
            torch.manual_seed(2)
            actual = block(tokens)
            torch.manual_seed(2)
            reference.conv_block.drop_path.train()
            expected = reference.conv_block(tokens.transpose(1, 2).reshape(6, dim, 4, 4)).flatten(2).transpose(1, 2)
            assert not torch.equal(actual, block.eval()(tokens))  # samples dropped
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('dim, bottleneck', [(8, False), (16, False), (16, True)])
def test_matmul_inner_block_runs_no_in_place_act_on_a_view_for_backward(dim, bottleneck):
    """ The GEMM form's training graph has no CopySlices node (an in-place act on a view of the GEMM's or the norm's
    output, whose backward clones the gradient), with the norm on rows (8 channels), aten's norm on a permuted view
    (16) and the bottleneck's per-pixel 1x1 GEMMs (reshaped views); the ReLUs still run in place on fresh tensors. """
    block = InnerResBlock(dim, (4, 4), bottleneck=bottleneck, impl='matmul').train()
    names = autograd_node_names(block(torch.randn(5, 16, dim, requires_grad=True)))
    assert 'CopySlices' not in names
    assert names.count('ReluBackward0') == len(block.stages)
    assert all(getattr(block.conv_block, stage[2] or block.out_act).inplace for stage in block.stages)


@pytest.mark.parametrize('momentum, affine, channels', [
    (0.1, True, 4), (None, True, 4), (0.3, False, 4), (0.1, True, 1)])
def test_batch_norm_on_pixel_rows_is_batchnorm2d_on_the_channels_last_view(momentum, affine, channels):
    """ Three training steps: outputs, input / weight / bias gradients and running stats (momentum, or the cumulative
    mean when it is None) equal nn.BatchNorm2d's on the (R, C, h, w) view of the rows; also for one channel (a
    bottleneck's narrowest in the micro models). """
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(channels, momentum=momentum, affine=affine)
    if affine:
        torch.nn.init.uniform_(reference.weight, 0.5, 1.5)
        torch.nn.init.normal_(reference.bias)
    bn = copy.deepcopy(reference)
    for _ in range(3):
        rows = (torch.randn(10, 16 * channels) * 3 + 1).requires_grad_()
        rows_ref = rows.detach().clone().requires_grad_()
        expected = reference(rows_ref.view(10, 4, 4, channels).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(
            10, 16 * channels)
        actual = batch_norm_pixel_rows(rows, bn, 16)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        grad = torch.randn_like(actual)
        actual.backward(grad)
        expected.backward(grad)
        torch.testing.assert_close(rows.grad, rows_ref.grad, atol=1e-5, rtol=1e-5)
        for b, b_ref in zip(bn.buffers(), reference.buffers()):
            torch.testing.assert_close(b, b_ref, atol=1e-6, rtol=1e-5)
    if affine:
        torch.testing.assert_close(bn.weight.grad, reference.weight.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bn.bias.grad, reference.bias.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('channels', [1, 3])
def test_per_group_values_are_dense_repeats(channels):
    """ `per_group` repeats per-channel values once per group, channel-minor, as `Tensor.repeat` does, into dense
    tensors (aten's BatchNorm kernels read them as such; of one channel a reshape of the expand would be a stride-0
    view); `group_prefix` cuts them to a smaller input's groups. """
    values = torch.arange(1., channels + 1)
    for groups in (1, 4):
        repeated, absent = per_group(groups, values, None)
        assert absent is None and torch.equal(repeated, values.repeat(groups)) and repeated.stride() == (1,)
    small = torch.zeros(2, 2 * channels)  # two groups of an input whose BatchNorm channels are its dim 1
    assert torch.equal(group_prefix(small, per_group(4, values)[0])[0], values.repeat(2))


@pytest.mark.parametrize('offset', [1., 100.])
def test_batch_norm_on_pixel_rows_keeps_float32_precision_far_from_zero(offset):
    """ float32 rows whose channel means are up to `offset` times their spread (a GEMM output far from zero): the
    row norm's outputs and input gradients stay within 1e-4 / 1e-5 (relative) of BatchNorm2d's in float64. Variances
    from E[x^2] - E[x]^2 miss that at offset 100 (8e-4, checked). """
    torch.manual_seed(0)
    rows64 = torch.randn(200, 16 * 8, dtype=torch.float64) + offset * torch.randn(8, dtype=torch.float64).repeat(16)
    grad = torch.randn_like(rows64)
    reference = torch.nn.BatchNorm2d(8).to(torch.float64)
    rows_ref = rows64.clone().requires_grad_()
    expected = reference(rows_ref.view(200, 4, 4, 8).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(200, 128)
    expected.backward(grad)
    rows = rows64.float().requires_grad_()
    actual = batch_norm_pixel_rows(rows, torch.nn.BatchNorm2d(8), 16)
    actual.backward(grad.float())
    torch.testing.assert_close(actual.double(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(rows.grad.double(), rows_ref.grad, atol=1e-5 * rows_ref.grad.abs().max().item(), rtol=0)


def test_matmul_inner_block_normalizes_rows_on_cpu_and_leaves_other_norms_to_themselves(monkeypatch):
    """ The GEMM form's training step takes the row BatchNorm for a plain BatchNorm2d of 4 or 8 channels on CPU
    (BatchNorm2d.forward is not called); from 16 channels, or for a subclass that does more than the norm (timm's
    BatchNormAct2d), the norm runs its own forward. """
    from timm.layers import BatchNormAct2d
    calls = []
    for cls in (torch.nn.BatchNorm2d, BatchNormAct2d):
        monkeypatch.setattr(cls, 'forward', lambda self, x, f=cls.forward: calls.append(type(self)) or f(self, x))
    x = torch.randn(3, 16, 4)
    InnerResBlock(4, (4, 4), impl='matmul').train()(x)
    assert calls == []
    InnerResBlock(4, (4, 4), impl='matmul', norm_layer=BatchNormAct2d).train()(x)
    assert calls == [BatchNormAct2d, BatchNormAct2d]
    InnerResBlock(8, (4, 4), impl='matmul').train()(torch.randn(3, 16, 8))  # CNT-Ti's width
    assert calls[2:] == []
    InnerResBlock(16, (4, 4), impl='matmul').train()(torch.randn(3, 16, 16))
    assert calls[2:] == [torch.nn.BatchNorm2d, torch.nn.BatchNorm2d]


@pytest.mark.parametrize('dim, bottleneck, expected', [
    (8, False, 'matmul'),  # CNT-Ti's width: narrower than one AVX-512 fp32 vector
    (16, False, 'conv'),  # CNT-S's
    (32, False, 'conv'),  # CNT-B's
    (32, True, 'matmul'),  # the bottleneck's 3x3 runs at 32 / 4 = 8 channels
])
def test_auto_inner_impl_on_cpu_follows_the_narrowest_conv(dim, bottleneck, expected):
    block = InnerResBlock(dim, (4, 4), bottleneck=bottleneck)
    x = torch.randn(2, 16, dim)
    assert block._impl_for(x) == expected
    for impl in ('conv', 'matmul'):  # a named implementation is taken as named
        assert InnerResBlock(dim, (4, 4), bottleneck=bottleneck, impl=impl)._impl_for(x) == impl


@pytest.mark.parametrize('inner_impl', ['conv', 'matmul'])
def test_model_logits_and_flops_do_not_depend_on_inner_impl(inner_impl):
    torch.manual_seed(0)
    auto = timm.create_model('cnt_nano_patch7_28')
    for m in auto.modules():
        if isinstance(m, InnerResBlock):
            _trained_like(m).init_weights(zero_init_last=False)
    other = timm.create_model('cnt_nano_patch7_28', inner_impl=inner_impl)
    other.load_state_dict(auto.state_dict())
    x = torch.randn(3, 1, 28, 28)
    for training in (False, True):
        with torch.no_grad():
            torch.testing.assert_close(other.train(training)(x), auto.train(training)(x), atol=1e-5, rtol=1e-5)
    assert count_flops(other, input_size=(1, 28, 28)).gmacs == count_flops(auto, input_size=(1, 28, 28)).gmacs


def _saved_bytes(run):
    """ What autograd keeps for backward while `run()` builds the graph, in bytes, and run()'s result. """
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(saved), out


@pytest.mark.parametrize('inner_block', ['basic', 'attn'])
def test_recomputed_pixel_path_gives_the_same_step_with_less_saved(inner_block):
    """ recompute_pixels=True vs kept activations (the default), one training step with drop path on: same logits,
    gradients and BatchNorm running stats (updated once), and backward holds less. """
    def saved_bytes_and_step(**recompute):
        torch.manual_seed(0)
        model = _small_cnt(inner_block=inner_block, drop_path_rate=0.3, **recompute).train()
        _randomize(model)
        x = torch.randn(4, 3, 32, 32)
        torch.manual_seed(1)  # the drop-path draws
        saved, out = _saved_bytes(lambda: model(x))
        out.square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return saved, out, grads, {k: v for k, v in model.state_dict().items() if 'running' in k}

    saved_r, out_r, grads_r, stats_r = saved_bytes_and_step(recompute_pixels=True)
    saved_k, out_k, grads_k, stats_k = saved_bytes_and_step(recompute_pixels=False)
    assert saved_bytes_and_step(recompute_pixels='cpu')[0] == saved_r
    assert saved_bytes_and_step()[0] == saved_k
    assert torch.allclose(out_r, out_k, atol=1e-6)
    for n in grads_k:
        assert torch.allclose(grads_r[n], grads_k[n], atol=1e-6), n
    for k in stats_k:
        assert torch.equal(stats_r[k], stats_k[k]), k
    assert saved_r < 0.8 * saved_k, (saved_r, saved_k)


def _check_recompute_rule(module: torch.nn.Module, setting_name: str, recomputes, shape) -> torch.Tensor:
    """ The rule of a recompute setting: 'cpu' for CPU tensors only (a meta tensor stands in for an accelerator's),
    True / False everywhere; set to True, never without grad or in eval. Returns a CPU input that recomputes. """
    on = {device: torch.zeros(*shape, device=device, requires_grad=True) for device in ('cpu', 'meta')}
    for setting, expected in (('cpu', {'cpu': True, 'meta': False}), (True, {'cpu': True, 'meta': True}),
                              (False, {'cpu': False, 'meta': False})):
        setattr(module, setting_name, setting)
        assert {d: recomputes(x) for d, x in on.items()} == expected, setting
    setattr(module, setting_name, True)
    assert not recomputes(on['cpu'].detach())
    with torch.no_grad():
        assert not recomputes(on['cpu'])
    module.eval()
    assert not recomputes(on['cpu'])
    module.train()
    assert recomputes(on['cpu'])
    return on['cpu']


def test_recompute_pixels_cpu_recomputes_on_cpu_only():
    """ recompute_pixels='cpu': recompute for CPU tensors, keep the activations on other devices (a meta tensor stands
    in for an accelerator's); an explicit True / False holds everywhere; never in eval or without grad. Every
    registered CNT keeps them by default; CNT-S and CNT-B recompute their outer MLPs' activations on CPU instead
    (CNT-Ti and the micro CNT keep them). """
    settings = (('cnt_ti_patch16_224', False), ('cnt_s_patch16_224', 'cpu'), ('cnt_b_patch16_224', 'cpu'),
                ('cnt_micro_patch4_28', False))
    for name, mlp_setting in settings:
        block = timm.create_model(name, img_size=32).blocks[0]
        assert block.recompute_pixels is False and block.outer.mlp.recompute_act == mlp_setting, name
    block = _small_cnt().train().blocks[0]
    _check_recompute_rule(block, 'recompute_pixels', block._recomputed, (2, 16, 8))


@pytest.mark.parametrize('act_layer', [torch.nn.GELU, partial(torch.nn.GELU, approximate='tanh'), torch.nn.SiLU])
@pytest.mark.parametrize('bias', [True, False])
def test_act_recomputing_mlp_is_timm_mlp_keeping_one_hidden_tensor_less(act_layer, bias):
    """ float64: the same outputs and gradients (input, fc1, fc2) as timm's Mlp, and backward keeps exactly one
    (tokens, hidden) tensor less: the activation's output. """
    torch.manual_seed(0)
    plain = Mlp(6, 24, act_layer=act_layer, bias=bias).double()
    recomputing = ActRecomputingMlp(6, 24, act_layer=act_layer, bias=bias, recompute_act=True).double()
    recomputing.load_state_dict(plain.state_dict())
    results = []
    for mlp in (plain, recomputing):
        torch.manual_seed(1)
        x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
        saved, out = _saved_bytes(lambda: mlp(x))
        out.sin().sum().backward()
        results.append((saved, out, x.grad, {n: p.grad for n, p in mlp.named_parameters()}))
    (saved_p, out_p, gx_p, grads_p), (saved_r, out_r, gx_r, grads_r) = results
    assert saved_p - saved_r == 3 * 5 * 24 * 8
    torch.testing.assert_close(out_r, out_p, atol=1e-12, rtol=0)
    torch.testing.assert_close(gx_r, gx_p, atol=1e-12, rtol=0)
    assert grads_r.keys() == grads_p.keys() == {n for n, _ in plain.named_parameters()}
    for n in grads_p:
        torch.testing.assert_close(grads_r[n], grads_p[n], atol=1e-12, rtol=0, msg=n)


def test_act_recomputing_mlp_gelu_backward_uses_two_hidden_buffers():
    """ With GELU the backward's recomputed activation and the hidden gradient share one (tokens, hidden) buffer, and
    fc1's output gradient is a second one (not written over its own input, where aten's kernel runs slower): two
    large allocations instead of autograd's three (each a fresh mmap above 32 MiB on CPU). """
    from torch.utils._python_dispatch import TorchDispatchMode

    class HiddenBuffers(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.storages = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dim() and out.shape[-1] == 24 and out.numel() == 3 * 5 * 24:
                self.storages.add(out.untyped_storage().data_ptr())
            return out

    mlp = ActRecomputingMlp(6, 24, recompute_act=True).double()
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    out = mlp(x)
    with HiddenBuffers() as mode:
        out.sin().sum().backward()
    assert len(mode.storages) == 2 and x.grad is not None


def test_act_recomputing_mlp_recomputes_only_where_it_applies():
    """ 'cpu' (default): eager CPU training with grad only (a meta tensor stands in for an accelerator's); True / False
    everywhere; the plain Mlp in eval, without grad, under autocast, and for a hidden dropout or norm, or an in-place
    activation, which the recompute could not reproduce. """
    mlp = ActRecomputingMlp(8, 16)
    x = _check_recompute_rule(mlp, 'recompute_act', mlp._recomputes, (2, 4, 8))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not mlp._recomputes(x)
    for kwargs in (dict(drop=0.1), dict(norm_layer=torch.nn.LayerNorm), dict(act_layer=partial(torch.nn.ReLU, True))):
        assert not ActRecomputingMlp(8, 16, recompute_act=True, **kwargs)._recomputes(x), kwargs
    assert ActRecomputingMlp(8, 16, recompute_act=True, drop=(0., 0.1))._recomputes(x)


@pytest.mark.parametrize('act_layer', [torch.nn.GELU, partial(torch.nn.GELU, approximate='tanh'), torch.nn.SiLU])
def test_act_recomputing_mlp_without_grad_runs_gelu_in_fc1s_output(act_layer):
    """ Under no_grad / inference_mode the outputs are timm's Mlp's to the bit; torch's GELU overwrites fc1's output
    (one (tokens, hidden) tensor), any other activation runs out of place; with grad it never runs in place. """
    torch.manual_seed(0)
    plain = Mlp(6, 24, act_layer=act_layer).eval()
    mlp = ActRecomputingMlp(6, 24, act_layer=act_layer).eval()
    mlp.load_state_dict(plain.state_dict())
    fc1_outputs = []
    mlp.fc1.register_forward_hook(lambda module, args, out: fc1_outputs.append((out, out.clone())))
    x = torch.randn(3, 5, 6)
    gelu = act_layer is not torch.nn.SiLU
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            assert torch.equal(mlp(x), plain(x))
        out, before = fc1_outputs.pop()
        assert torch.equal(out, mlp.act(before) if gelu else before), context
    assert torch.equal(mlp(x), plain(x))  # with grad (eval): fc1's output stays what fc1 gave
    out, before = fc1_outputs.pop()
    assert torch.equal(out, before)


@pytest.mark.parametrize('setting', [None, 1, 'gpu'])
def test_recompute_settings_other_than_true_false_cpu_are_refused(setting):
    for make in (lambda: CNT(img_size=32, patch_size=16, recompute_pixels=setting, depth=1),
                 lambda: ActRecomputingMlp(8, 16, recompute_act=setting)):
        with pytest.raises(ValueError, match=r"must be one of \(True, False, 'cpu'\), got"):
            make()


def test_cnt_outer_mlp_recompute_gives_the_same_step_with_less_saved():
    """ recompute_mlp_act on / off, one training step with drop path: same logits, gradients and state-dict keys;
    backward keeps the outer MLPs' activation outputs less. """
    def step(recompute):
        torch.manual_seed(0)
        model = _small_cnt(drop_path_rate=0.3, recompute_mlp_act=recompute).train()
        _randomize(model)
        x = torch.randn(4, 3, 32, 32)
        torch.manual_seed(1)
        saved, out = _saved_bytes(lambda: model(x))
        out.square().sum().backward()
        return saved, out, {n: p.grad for n, p in model.named_parameters()}, model

    saved_r, out_r, grads_r, model_r = step(True)
    saved_k, out_k, grads_k, model_k = step(False)
    assert step('cpu')[0] == saved_r  # the default recomputes on CPU
    assert model_r.state_dict().keys() == model_k.state_dict().keys()
    hidden_numel = 4 * (1 + 4) * 32 * 4  # batch x (class + patch tokens) x MLP hidden width (4 x 32)
    assert saved_k - saved_r == 2 * hidden_numel * 4  # two blocks, fp32
    torch.testing.assert_close(out_r, out_k, atol=1e-6, rtol=0)
    for n in grads_k:
        torch.testing.assert_close(grads_r[n], grads_k[n], atol=1e-6, rtol=0, msg=n)


@pytest.mark.parametrize('dist_token', [False, True])
def test_pixel_to_patch_add_keeps_nothing_for_backward(monkeypatch, dist_token):
    """ The eager training step adds each block's pixel projection to the patch tokens through `_AddToPatchTokens`:
    the same logits and gradients as autograd's index_add (float64), and the projection (norm2_proj's output, a
    (B, N, D) tensor a block), which index_add keeps although its backward needs only the shape, is no longer kept. """
    def step(add_keeps_nothing):
        monkeypatch.setattr(cnt_module.Block, '_keeps_nothing_for_the_add', lambda self, a, b: add_keeps_nothing)
        torch.manual_seed(0)
        model = _randomize(_small_cnt(depth=3, dist_token=dist_token).double().train())
        projections = []  # held, so that no tensor made later can take a projection's freed address
        for blk in model.blocks:
            blk.norm2_proj.register_forward_hook(lambda m, args, out: projections.append(out))
        kept = set()

        def pack(t):
            kept.add(t.untyped_storage().data_ptr())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(torch.randn(4, 3, 32, 32, dtype=torch.float64))
        out.square().sum().backward()
        projections_kept = sum(p.untyped_storage().data_ptr() in kept for p in projections)
        return out.detach(), {n: p.grad for n, p in model.named_parameters()}, projections_kept

    out_new, grads_new, projections_kept_new = step(True)
    out_old, grads_old, projections_kept_old = step(False)
    assert (projections_kept_new, projections_kept_old) == (0, 3)
    torch.testing.assert_close(out_new, out_old, rtol=0, atol=1e-12)
    for n in grads_old:
        torch.testing.assert_close(grads_new[n], grads_old[n], rtol=0, atol=1e-12, msg=n)


def test_pixel_to_patch_add_takes_the_function_only_where_backward_runs(monkeypatch):
    """ The Function only where backward will run; without grad, or with no input that needs one, the plain one-pass
    add (`add_to_patch_tokens`, the same sum as index_add, to the bit); traced graphs keep index_add. """
    block = _small_cnt().train().blocks[0]
    tokens, pixels = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 4, 32)
    assert block._keeps_nothing_for_the_add(tokens, pixels) and not block._adds_without_graph(tokens, pixels)
    assert not block._keeps_nothing_for_the_add(tokens.detach(), pixels)
    assert block._adds_without_graph(tokens.detach(), pixels)
    with torch.no_grad():
        assert not block._keeps_nothing_for_the_add(tokens, pixels) and block._adds_without_graph(tokens, pixels)
        expected = tokens.index_add(1, torch.arange(1, 5), pixels)
        assert torch.equal(cnt_module.add_to_patch_tokens(tokens, pixels, 1), expected)
        monkeypatch.setattr(cnt_module, 'traced_or_compiling', lambda: True)  # what fx / jit tracing report
        assert not block._adds_without_graph(tokens, pixels)


@pytest.mark.parametrize('inner_impl', ['conv', 'matmul'])
@pytest.mark.parametrize('conv_norm_layer', [None, _NORM_ACT], ids=['bn', 'bn_act'])
def test_reparameterize_model_folds_batchnorm_with_equal_logits(inner_impl, conv_norm_layer, monkeypatch):
    """ timm's reparameterize_model folds each inner BatchNorm into its conv (a BatchNormAct2d leaves its act); eval
    logits stay those of timm's ResNet blocks as they are, before and after (twice is a no-op). """
    torch.manual_seed(0)
    model = _small_cnt(
        inner_block='bottleneck', inner_block_args=dict(impl=inner_impl, conv_norm_layer=conv_norm_layer))
    for m in model.modules():
        if isinstance(m, InnerResBlock):
            _trained_like(m).init_weights(zero_init_last=False)
    model.eval()
    fused = reparameterize_model(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # a copy by default
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, fused_logits, twice_logits = model(x), fused(x), reparameterize_model(fused)(x)
        monkeypatch.setattr(InnerResBlock, 'forward', InnerResBlock.forward_plain)
        expected = model(x)
    for actual in (logits, fused_logits, twice_logits):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('training', [True, False])
def test_inner_block_with_a_norm_that_does_not_fold_runs_the_plain_block(training):
    """ GroupNorm has no running statistics to fold: every mode runs timm's block as it is, and timm's
    reparameterize_model leaves it so. """
    block = InnerResBlock(8, (4, 4), norm_layer=timm.layers.GroupNorm1).train(training)
    block.init_weights(zero_init_last=False)
    tokens = torch.randn(3, 16, 8)
    with torch.no_grad():
        expected = block.forward_plain(tokens)
        torch.testing.assert_close(block(tokens), expected, atol=0, rtol=0)
        reparameterize_model(torch.nn.Sequential(block), inplace=True)  # it reparameterizes children only
        assert isinstance(block.conv_block.bn1, timm.layers.GroupNorm1) and not block.folded_norms
        torch.testing.assert_close(block(tokens), expected, atol=0, rtol=0)


def test_inner_block_is_a_callable_like_vit_block_fn():
    """ CNT takes any callable fn(dim, pixel_grid, drop_path=, **dd); names are a shortcut at the model level. """
    calls = []

    def identity_block(dim, pixel_grid, drop_path=0., device=None, dtype=None):
        calls.append((dim, pixel_grid, drop_path))
        return torch.nn.Identity()

    model = _small_cnt(inner_block=identity_block, drop_path_rate=0.1)
    assert calls == [(8, (4, 4), 0.0), (8, (4, 4), pytest.approx(0.1))]
    assert all(isinstance(b.inner, torch.nn.Identity) for b in model.blocks)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ValueError, match='inner_block_args apply to a named inner_block'):
        _small_cnt(inner_block=identity_block, inner_block_args=dict(impl='conv'))
    with pytest.raises(ValueError, match="Unknown inner_impl 'gemm', expected one of"):
        timm.create_model('cnt_nano_patch7_28', inner_impl='gemm')
    with pytest.raises(ValueError, match="inner_impl='matmul' needs BatchNorm"):
        timm.create_model('cnt_nano_patch7_28', inner_impl='matmul', conv_norm_layer='groupnorm1')


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
    size_error = r'Input image size \(48x32\) does not match the model \(32x32\).*img_size=\(48, 32\)'
    with pytest.raises(AssertionError, match=size_error):
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
        if isinstance(m, InnerResBlock):
            assert torch.count_nonzero(m.conv_block.bn2.weight) == 0
    model = _small_cnt(zero_init_last=False)
    assert all(torch.count_nonzero(m.conv_block.bn2.weight) > 0
               for m in model.modules() if isinstance(m, InnerResBlock))
