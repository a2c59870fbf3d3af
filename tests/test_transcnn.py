""" TransCNN / HAT-Net (models/transcnn.py): official parity, any input size, the timm API on small configs. """
import json
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers import BatchNormAct2d, GroupNorm1
from timm.models._features_fx import create_feature_extractor
from timm.utils import reparameterize_model
from torch.utils._python_dispatch import TorchDispatchMode

from timm_hybrid import count_flops  # importing timm_hybrid registers the models
from timm_hybrid.models import _common, transcnn
from timm_hybrid.models.transcnn import avg_pool_partial, checkpoint_filter_fn, window_attention

FIXTURES = Path(__file__).parent / 'fixtures'
MODELS = timm.list_models(['transcnn_*', 'hatnet_*'])

# Parameters of the official models (TransCNN.py at tag v1.0, HAT_Net.py at HEAD) and the part of them that HAT-Net
# defines but never uses (attn.proj_norm), which ours leaves out.
OFFICIAL_PARAMS = {
    'transcnn_tiny': (13_315_976, 0),
    'transcnn_small': (26_538_824, 0),
    'transcnn_medium': (48_322_504, 0),
    'transcnn_large': (80_033_352, 0),
    'hatnet_tiny': (12_655_912, 5_760),
    'hatnet_small': (25_747_784, 9_216),
    'hatnet_medium': (42_942_472, 16_512),
    'hatnet_large': (63_132_488, 23_552),
}
# fvcore on the official implementations at 256 / 224 px, attention matmuls included. HAT-Net's README figures
# (2.0 / 4.3 / 8.3 / 11.5 G) are the same counts without the attention matmuls (1.99 / 4.32 / 8.35 / 11.51).
OFFICIAL_GMACS = {'transcnn_tiny': 2.877, 'hatnet_tiny': 2.146}

# each variant's own structure (norms, windows, FFN type, kernels) at a width and depth that runs in milliseconds
SMALL = dict(embed_dims=(16, 24, 32, 48), head_dim=8, depths=(1, 1, 1, 1), num_classes=5)
ODD_SIZE = (2, 3, 100, 76)  # neither a multiple of 128 nor of 224; stage maps 25x19, 13x10, 7x5, 4x3


def _small(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, **dict(SMALL, **kwargs))


def test_all_variants_registered_with_official_weights():
    assert set(MODELS) == set(OFFICIAL_PARAMS)
    for name in MODELS:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url.startswith('https://github.com/yun-liu/')
        assert cfg.paper_ids == 'arXiv:2106.03180' and cfg.paper_name and cfg.origin_url and cfg.license
        assert cfg.input_size == ((3, 256, 256) if name.startswith('transcnn') else (3, 224, 224))


@pytest.mark.parametrize('name', MODELS)
def test_param_count_matches_official(name):
    official, unused = OFFICIAL_PARAMS[name]
    model = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == official - unused


def _logits_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple:
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize('name', MODELS)
def test_forward_backward_at_non_official_size_with_and_without_grad_checkpointing(name):
    model = _small(name).train()
    x = torch.randn(ODD_SIZE)
    out, grads = _logits_and_grads(model, x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert [n for n, g in grads.items() if g is None] == []
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = _logits_and_grads(model, x)
    torch.testing.assert_close(out_ckpt, out)
    torch.testing.assert_close(grads_ckpt, grads, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('size', [ODD_SIZE, (2, 3, 64, 64)])
@pytest.mark.parametrize('name', ['transcnn_tiny', 'hatnet_tiny'])
def test_channels_last_fast_path_equals_plain_nchw(name, size, train):
    """ The channels-last maps (fused attention on views, one copy per window gather / scatter) against the plain
    NCHW layout: the same weights give the same logits and gradients. """
    torch.manual_seed(0)
    fast = _small(name, channels_last=True).train(train)
    plain = _small(name, channels_last=False).train(train)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(size)
    out_fast, grads_fast = _logits_and_grads(fast, x)
    out_plain, grads_plain = _logits_and_grads(plain, x)
    assert (out_fast - out_plain).abs().max() < 1e-5
    assert max((grads_fast[n] - grads_plain[n]).abs().max() for n in grads_plain) < 1e-5
    assert fast.forward_features(x).is_contiguous(memory_format=torch.channels_last)


def test_group_norm_keeps_channels_last_maps_on_every_device_and_equals_timms():
    """ HAT-Net's GroupNorm(1): aten's group_norm returns a channels-last map NCHW on any device but the CPU (the meta
    device runs the same code as CUDA); the layer-norm form keeps it channels-last with the same values and gradients
    (float64) as timm's GroupNorm1, and HAT-Net builds every norm, the stem's and downsampling's too, from it. """
    norm = transcnn.LayoutKeepingGroupNorm1(12, eps=1e-6).double()
    timm_norm = GroupNorm1(12, eps=1e-6).double()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    timm_norm.load_state_dict(norm.state_dict())
    x = torch.randn(3, 12, 5, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    ours = transcnn.group_norm1_channels_last(x, norm.weight, norm.bias, norm.eps)
    reference = timm_norm(x)
    assert ours.is_contiguous(memory_format=torch.channels_last) and not ours.is_contiguous()
    upstream = torch.randn_like(reference)
    grads = torch.autograd.grad(ours, (x, norm.weight, norm.bias), upstream)
    expected = torch.autograd.grad(reference, (x, timm_norm.weight, timm_norm.bias), upstream)
    assert (ours - reference).abs().max() < 1e-12
    assert max((g - e).abs().max() for g, e in zip(grads, expected)) < 1e-12

    on_meta = torch.empty(2, 12, 5, 7, device='meta').contiguous(memory_format=torch.channels_last)
    assert GroupNorm1(12).to('meta')(on_meta).is_contiguous()  # aten: NCHW out
    for layer in (transcnn.LayoutKeepingGroupNorm1, transcnn.LayoutKeepingGroupNorm1Act):
        assert layer(12, device='meta')(on_meta).is_contiguous(memory_format=torch.channels_last)
        assert layer(12)(torch.randn(2, 12, 5, 7)).is_contiguous()  # an NCHW map stays NCHW

    timm.layers.set_fast_norm(True)  # timm's own fast-norm kernels, when asked for, run as in timm's layers
    try:
        fast = transcnn.LayoutKeepingGroupNorm1(12, eps=1e-6).double()
        fast_act = transcnn.LayoutKeepingGroupNorm1Act(12, eps=1e-6).double()
    finally:
        timm.layers.set_fast_norm(False)
    fast.load_state_dict(norm.state_dict())
    fast_act.load_state_dict(norm.state_dict())
    assert fast._fast_norm and fast_act._fast_norm
    torch.testing.assert_close(fast(x), reference)
    torch.testing.assert_close(fast_act(x), torch.nn.functional.relu(reference))

    model = _small('hatnet_tiny')
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert {type(m) for m in norms} == {transcnn.LayoutKeepingGroupNorm1, transcnn.LayoutKeepingGroupNorm1Act}
    assert {m.eps for m in norms} == {1e-6}
    assert isinstance(model.stem[0].bn.act, torch.nn.SiLU) and isinstance(model.stages[1].downsample.conv.bn.act,
                                                                        torch.nn.Identity)


@pytest.mark.parametrize('train', [False, True])
def test_hatnet_with_every_norm_on_the_channels_last_path_equals_the_default(train, monkeypatch):
    """ The whole model with each GroupNorm taking the layer-norm form (as on a GPU; forced here on CPU): the same
    logits and gradients as aten's group_norm, and the maps stay channels-last to the end. """
    torch.manual_seed(0)
    model = _small('hatnet_tiny').double().train(train)
    x = torch.randn(ODD_SIZE, dtype=torch.float64)
    out, grads = _logits_and_grads(model, x)
    taken = []

    def on_gpu_path(t):
        moves = t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
        taken.append(moves)
        return moves
    monkeypatch.setattr(transcnn, 'moves_layout_in_group_norm', on_gpu_path)
    torch.manual_seed(0)
    out_cl, grads_cl = _logits_and_grads(model, x)
    assert taken and all(taken)
    assert (out_cl - out).abs().max() < 1e-10
    assert max((grads_cl[n] - grads[n]).abs().max() for n in grads) < 1e-10
    assert model.forward_features(x).is_contiguous(memory_format=torch.channels_last)


class _AtenOpCounter(TorchDispatchMode):
    """ Counts the aten ops that run below autograd (autograd's own clones of inputs it keeps included). """

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _aten_ops(model: torch.nn.Module, x: torch.Tensor) -> Counter:
    with _AtenOpCounter() as counter:
        model(x)
    return counter.counts


def test_hatnet_training_keeps_no_copy_of_an_activation_input(monkeypatch):
    """ In an eager training step HAT-Net's SiLUs (FFNs and stem) run out of place, so autograd keeps their
    inputs without cloning them (a SiLU in place has its input cloned first): the same logits and gradients, one
    clone fewer per SiLU. Without grad they run in place, as built. """
    torch.manual_seed(0)
    model = _small('hatnet_tiny').double().train()
    x = torch.randn(ODD_SIZE, dtype=torch.float64)
    num_silus = sum(isinstance(m, torch.nn.SiLU) for m in model.modules())
    ops = _aten_ops(model, x)
    assert ops['silu'] == num_silus and ops['silu_'] == 0
    out, grads = _logits_and_grads(model, x)
    with torch.no_grad():
        ops_no_grad = _aten_ops(model, x)
    assert ops_no_grad['silu_'] == num_silus and ops_no_grad['silu'] == 0
    monkeypatch.setattr(transcnn, 'act_for', lambda x, act: act)  # the acts as built, in place
    ops_in_place = _aten_ops(model, x)
    assert ops_in_place['silu_'] == num_silus and ops_in_place['clone'] == ops['clone'] + num_silus
    out_in_place, grads_in_place = _logits_and_grads(model, x)
    assert (out - out_in_place).abs().max() < 1e-12
    assert max((grads[n] - grads_in_place[n]).abs().max() for n in grads) < 1e-12


@pytest.mark.parametrize('checkpointing', [False, True])
def test_hatnet_cpu_training_runs_in_chunks_with_the_whole_batchs_step(checkpointing):
    """ HAT-Net's norms take no batch statistics, so a CPU training forward runs cpu_chunk images at a time (the stem
    sees chunks) with the whole batch's logits and gradients (float64); TransCNN's BatchNorms need the batch whole:
    in training it runs whole, in eval in chunks. """
    torch.manual_seed(0)
    model = _small('hatnet_tiny', cpu_chunk=2).double().train()
    model.set_grad_checkpointing(checkpointing)
    batch_sizes = []
    model.stem.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    x = torch.randn(5, *ODD_SIZE[1:], dtype=torch.float64)
    chunked, chunked_grads = _logits_and_grads(model, x)
    assert batch_sizes[:3] == [2, 2, 1]
    model.cpu_chunk = 0
    whole, whole_grads = _logits_and_grads(model, x)
    assert batch_sizes[-1] == 5
    assert (chunked - whole).abs().max() < 1e-12
    assert max((chunked_grads[n] - whole_grads[n]).abs().max() for n in whole_grads) < 1e-12
    transcnn_model = _small('transcnn_tiny', cpu_chunk=2)
    transcnn_sizes = []
    transcnn_model.stem.register_forward_pre_hook(lambda module, args: transcnn_sizes.append(args[0].shape[0]))
    transcnn_model.train()(x.float())
    with torch.no_grad():
        transcnn_model.eval()(x.float())
    assert transcnn_sizes == [5, 2, 2, 1]


def test_hatnet_training_chunks_are_larger_than_eval_ones():
    """ Auto chunks of HAT-Net-S at 224: its widest map (512 x 56 x 56 floats, 6.1 MiB an image) under 24 MiB in eval,
    TRAIN_CHUNK_SCALE (2) times that many images in training; TransCNN-S trains whole (BatchNorm). """
    x = torch.empty(32, 3, 224, 224)
    model = timm.create_model('hatnet_small')
    assert transcnn.TRAIN_CHUNK_SCALE == 2
    assert model.eval()._cpu_chunk(x) == 3 and model.train()._cpu_chunk(x) == 7  # 24 MiB // 3.06 MiB
    assert timm.create_model('transcnn_small').train()._cpu_chunk(x) == 0


def _window_attention_loop(qkv: torch.Tensor, heads: int, ws: int) -> torch.Tensor:
    """ Window attention written plainly: one window at a time, explicit softmax over its real pixels only. """
    B, C3, H, W = qkv.shape
    C = C3 // 3
    out = torch.zeros(B, C, H, W, dtype=qkv.dtype)
    for top in range(0, H, ws):
        for left in range(0, W, ws):
            cell = qkv[..., top:top + ws, left:left + ws]
            h, w = cell.shape[-2:]
            q, k, v = cell.reshape(B, 3, heads, C // heads, h * w).transpose(-2, -1).unbind(1)
            attn = (q @ k.transpose(-2, -1) * (C // heads) ** -0.5).softmax(-1)
            out[..., top:top + ws, left:left + ws] = (attn @ v).transpose(-2, -1).reshape(B, C, h, w)
    return out


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('fused', [True, False])
def test_window_attention_equals_per_window_loop(fused, memory_format):
    qkv = torch.randn(2, 3 * 8, 13, 18).contiguous(memory_format=memory_format).requires_grad_()
    grad = torch.randn(2, 8, 13, 18)
    out = window_attention(qkv, 2, 8, fused)
    (grad_fast,) = torch.autograd.grad((out * grad).sum(), qkv)
    expected = _window_attention_loop(qkv, 2, 8)
    (grad_loop,) = torch.autograd.grad((expected * grad).sum(), qkv)
    assert (out - expected).abs().max() < 1e-5
    assert (grad_fast - grad_loop).abs().max() < 1e-5


@pytest.mark.parametrize('name', ['transcnn_tiny', 'hatnet_tiny'])
def test_features_only_at_non_official_size(name):
    model = _small(name, features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = model(torch.randn(ODD_SIZE))
    H, W = ODD_SIZE[-2:]
    assert [tuple(m.shape[1:]) for m in maps] == [
        (c, -(-H // r), -(-W // r)) for c, r in zip(SMALL['embed_dims'], (4, 8, 16, 32))]


@pytest.mark.parametrize('name', ['transcnn_tiny', 'hatnet_tiny'])
def test_torchscript_and_fx_at_non_official_size(name):
    model = _small(name).eval()
    x = torch.randn(ODD_SIZE)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected)
        fx_model = create_feature_extractor(model, return_nodes=['stages.1', 'head.fc'])
        torch.testing.assert_close(fx_model(x)['head.fc'], expected)


@pytest.mark.parametrize('fused', [True, False])
def test_padded_windows_attend_only_to_real_pixels(fused):
    # 13x13 map, 8x8 windows: one whole window, three cut by the border
    heads, C, ws = 2, 8, 8
    qkv = torch.randn(1, 3 * C, 13, 13)
    out = window_attention(qkv, heads, ws, fused)
    torch.testing.assert_close(out[..., :8, :8], window_attention(qkv[..., :8, :8], heads, ws, fused))
    # the bottom-right 5x5 cell is plain MHSA over its own 25 pixels
    cell = qkv[..., 8:, 8:].reshape(1, 3, heads, C // heads, 25).transpose(-2, -1)
    expected = F.scaled_dot_product_attention(cell[:, 0], cell[:, 1], cell[:, 2])
    torch.testing.assert_close(out[..., 8:, 8:], expected.transpose(-2, -1).reshape(1, C, 5, 5))


@pytest.mark.parametrize('channels_last', [True, False])
def test_inference_folds_batchnorms_with_the_same_logits(channels_last, monkeypatch):
    """ In eval, TransCNN's FFN norms, the norms before the 1x1 qkv / kv convs and the downsampling norms fold into
    their convs; only the stem's norm and each attention's `local_norm` (on a residual sum) still run. Reference:
    the same model with folding switched off, in float64 with random running statistics. """
    torch.manual_seed(0)
    model = _small('transcnn_tiny', channels_last=channels_last).double().eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    ran = []
    for bn in norms:
        bn.register_forward_hook(lambda m, i, o: ran.append(m))
    x = torch.randn(ODD_SIZE, dtype=torch.float64)
    with torch.no_grad():
        folded = model(x)
        ran_folded = list(ran)
        ran.clear()
        monkeypatch.setattr(_common, 'folds_into_conv', lambda norm: False)
        expected = model(x)
    kept = {model.stem[0].bn} | {b.attn.local_norm for s in model.stages for b in s.blocks if b.attn.q is not None}
    assert set(ran_folded) == kept and len(ran) == len(norms)
    torch.testing.assert_close(folded, expected, rtol=1e-10, atol=1e-10)
    # timm's reparameterize_model folds the same norms into the modules (for traced / exported graphs)
    monkeypatch.undo()
    deploy = reparameterize_model(model)
    kept_names = {n for n, m in model.named_modules() if m in kept}
    assert {n for n, m in deploy.named_modules() if isinstance(m, torch.nn.BatchNorm2d)} == kept_names
    assert isinstance(deploy.stages[0].blocks[0].mlp.bn1, torch.nn.SiLU)  # the folded norm leaves its act behind
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(torch.jit.trace(deploy, x)(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('variant', ['transcnn_tiny', 'hatnet_tiny'])
def test_reparameterize_keeps_the_act_of_a_norm_act_layer(variant):
    """ With timm's BatchNormAct2d as norm_layer (SiLU), the norm before each attention's 1x1 qkv / kv conv runs an
    act after its affine, which the conv cannot absorb: reparameterize_model leaves that norm as it is (until
    2026-12-06 it folded the affine and dropped the act) and folds the others, with the same logits. """
    torch.manual_seed(0)
    model = _small(variant, norm_layer=partial(BatchNormAct2d, act_layer=torch.nn.SiLU)).double().eval()
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(ODD_SIZE, dtype=torch.float64)
    deploy = reparameterize_model(model)
    attn = deploy.stages[0].blocks[0].attn
    assert isinstance(attn.norm, BatchNormAct2d) and isinstance(attn.norm.act, torch.nn.SiLU)
    assert sum(isinstance(m, BatchNormAct2d) for m in deploy.modules()) < sum(
        isinstance(m, BatchNormAct2d) for m in model.modules())  # the others folded
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('family, variant', [('transcnn', 'transcnn_tiny'), ('hatnet', 'hatnet_tiny')])
def test_official_checkpoint_parity(family, variant):
    """ The official code (random weights, reduced widths, official window / pooling / kernel layout, at 128 px for
    TransCNN and 224 px for HAT-Net) against ours loading its state dict through timm's pretrained path. """
    weights = FIXTURES / f'{family}_official_state_dict.safetensors'
    with safe_open(str(weights), 'pt') as f:
        model_args = json.loads(f.metadata()['model_args'])
    io = load_file(str(FIXTURES / f'{family}_official_io.safetensors'))
    model = timm.create_model(
        variant, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights), num_classes=10), **model_args).eval()
    with torch.no_grad():
        out = model(io['input'].float())
    assert (out - io['output']).abs().max() < 1e-4


def test_checkpoint_filter_unwraps_training_checkpoints():
    official = load_file(str(FIXTURES / 'hatnet_official_state_dict.safetensors'))
    with safe_open(str(FIXTURES / 'hatnet_official_state_dict.safetensors'), 'pt') as f:
        model = timm.create_model('hatnet_tiny', **json.loads(f.metadata()['model_args']))
    expected = checkpoint_filter_fn(official, model)
    assert set(expected) == set(model.state_dict())  # proj_norm dropped, nothing missing
    for wrapped in ({'model': official}, {'state_dict': {'module.' + k: v for k, v in official.items()}}):
        converted = checkpoint_filter_fn(wrapped, model)
        assert converted.keys() == expected.keys()
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()


@pytest.mark.parametrize('bad_input, message', [
    (torch.randn(3, 64, 64), 'Expected a 4D image batch'),
    (torch.randn(1, 1, 64, 64), 'Input has 1 channels, the model was built for in_chans=3'),
])
def test_bad_input_gives_a_clear_error(bad_input, message):
    model = _small('hatnet_tiny').eval()
    with pytest.raises(AssertionError, match=message):
        model(bad_input)
    with pytest.raises(AssertionError, match=message):
        model.forward_intermediates(bad_input)


@pytest.mark.parametrize('name', sorted(OFFICIAL_GMACS))
def test_flops_fully_counted_and_equal_to_official(name):
    size = timm.models.get_pretrained_cfg(name).input_size
    result = count_flops(name, input_size=size)
    assert not result.unsupported
    assert result.gmacs == pytest.approx(OFFICIAL_GMACS[name], abs=1e-3)


@pytest.mark.parametrize('size', [(13, 10), (16, 8), (3, 5)])
def test_avg_pool_partial_equals_ceil_mode_avg_pool(size):
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 3, -(-size[0] // 4), -(-size[1] // 4), dtype=torch.float64)
    out = avg_pool_partial(x, 4)
    expected = F.avg_pool2d(x, 4, ceil_mode=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(
        torch.autograd.grad((out * grad_out).sum(), x)[0], torch.autograd.grad((expected * grad_out).sum(), x)[0])
