""" Refiner-ViT: registration, sizes, API, checkpoint conversion and parity with the released implementation. """
import copy
import json
import logging
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

import timm_hybrid
from timm_hybrid.models import refiner as refiner_module
from timm_hybrid.models.refiner import RefinerViT, checkpoint_filter_fn

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / 'fixtures'
OFFICIAL_STATE_DICT = FIXTURES / 'refiner_official_tiny_state_dict.safetensors'
OFFICIAL_IO = FIXTURES / 'refiner_official_tiny_io.safetensors'

# parameters of the released models built with their registered configs (released code @ b3e8cb0), the first three
# without the token-labelling aux head, the 448 model with it (its released weights were trained with it)
PARAM_COUNTS = {
    'refiner_vit_small_patch16_224': 25_023_656,
    'refiner_vit_medium_patch16_224': 55_029_932,
    'refiner_vit_large_patch16_224': 80_637_192,
    'refiner_vit_large_patch16_448': 81_451_248,
}
MODEL_NAMES = sorted(PARAM_COUNTS)
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=10)


def _tiny(**kwargs) -> RefinerViT:
    torch.manual_seed(0)
    return timm.create_model('refiner_vit_small_patch16_224', **dict(TINY, **kwargs))


def _official():
    """ The official reference's state dict (official key layout), its config, input, logits and features. """
    with safe_open(str(OFFICIAL_IO), 'pt') as f:
        cfg = json.loads(f.metadata()['config'])
    return load_file(str(OFFICIAL_STATE_DICT)), cfg, load_file(str(OFFICIAL_IO))


def test_registered():
    assert sorted(timm.list_models('refiner_vit_*')) == MODEL_NAMES
    for name in MODEL_NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.paper_ids == 'arXiv:2106.03714' and cfg.license and cfg.origin_url


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_param_count_matches_official(name):
    model = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


def test_aux_head_param_count():
    # the published 25M / 55M / 81M include the aux head: 25,408,656 for S
    model = timm.create_model('refiner_vit_small_patch16_224', aux_head=True, device='meta')
    assert sum(p.numel() for p in model.parameters()) == 25_408_656


@pytest.mark.parametrize('aux_head', [False, True])
def test_forward_backward_reaches_every_parameter(aux_head):
    model = _tiny(aux_head=aux_head).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_blocks_alternate_and_refiner_has_no_qk():
    model = _tiny()
    assert model.refiner_blocks == [False, True, False, True]
    assert hasattr(model.blocks[0].attn, 'qkv') and not hasattr(model.blocks[1].attn, 'qkv')
    assert model.blocks[1].attn.v.weight.shape == (32, 32)
    with pytest.raises(ValueError, match='first block'):
        _tiny(refiner_blocks=[True, False, True, False])


def test_features_only():
    model = timm.create_model('refiner_vit_small_patch16_224', features_only=True, out_indices=(1, 3), **TINY)
    feats = model(torch.randn(2, 3, 32, 32))
    assert [f.shape for f in feats] == [(2, 32, 8, 8)] * 2
    assert model.feature_info.reduction() == [4, 4]


def test_forward_intermediates_match_forward_features():
    model = _tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    final, intermediates = model.forward_intermediates(x, indices=[1, 3], output_fmt='NLC', norm=True)
    torch.testing.assert_close(final, model.forward_features(x))
    torch.testing.assert_close(intermediates[-1], final[:, 1:])


def test_grad_checkpointing_same_outputs_grads_and_bn_stats():
    x = torch.randn(2, 3, 32, 32)
    results = []
    for enable in (False, True):
        model = _tiny().train()
        model.set_grad_checkpointing(enable)
        out = model(x)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        results.append((out.detach(), grads, buffers))
    (out0, grads0, buf0), (out1, grads1, buf1) = results
    torch.testing.assert_close(out1, out0)
    torch.testing.assert_close(grads1, grads0)
    # the backward re-run of checkpointed blocks must not update BatchNorm running stats a second time
    torch.testing.assert_close(buf1, buf0)


def test_training_chunks_are_sized_by_the_maps_an_op_touches():
    """ A training step's refinement runs Refiner-S's 5.3 MiB expanded maps one image at a time (a backward op
    touches three of them: they stay in the cache), the stem its 6.4 MB maps three at a time; in eval the whole
    model runs two images at a time (an op reads one map and writes one). """
    model = timm.create_model('refiner_vit_small_patch16_224', depth=2).train()
    maps = torch.empty(32, 12, 197, 197)
    assert model.blocks[1].attn._train_chunk(maps) == 1
    assert model.patch_embed._train_chunk(torch.empty(32, 3, 224, 224)) == 3
    assert model.blocks[1].attn._train_chunk(maps[:1]) == 0  # one image is no batch to cut
    assert model.eval().blocks[1].attn._train_chunk(maps) == 0  # eval chunks the whole model instead


def _assert_same_training_steps(first, second) -> None:
    """ Two float64 training runs, each (logits, gradients, buffers), agree: logits and running stats to ~1e-10,
    gradients on the scale of the largest one (a BatchNorm bias ahead of another BatchNorm has a gradient of pure
    rounding in both). """
    (out0, grads0, buf0), (out1, grads1, buf1) = first, second
    torch.testing.assert_close(out1, out0, rtol=1e-10, atol=1e-12)
    scale = max(g.abs().max().item() for g in grads0.values())
    off = {n: (grads1[n] - g).abs().max().item() for n, g in grads0.items()
           if (grads1[n] - g).abs().max().item() > 1e-10 * scale + 1e-9 * g.abs().max().item()}
    assert not off, f'gradients off (largest |grad| {scale:.3g}): {off}'
    torch.testing.assert_close(buf1, buf0, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize('checkpointing', [False, True])
def test_cpu_chunked_training_step_equals_the_whole_batch(checkpointing):
    """ cpu_chunk: the conv stem and the refinements of a CPU training step on 2-image slices (the expanded maps
    channels-last), batch statistics of the whole batch (models/refiner.py _ChunkedBatchNorm): the same logits,
    every gradient and the same BatchNorm running stats, also with grad checkpointing (whose re-run must leave the
    stats alone). In float64: the two summation orders then agree to ~1e-15, while in fp32 the refiners' norms of
    near-uniform maps amplify the rounding of the stem's convolutions (which oneDNN blocks by batch size) to ~1e-5 of
    the logits. """
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    results = []
    for chunk in (0, 2):
        model = _tiny(cpu_chunk=chunk).double().train()
        model.set_grad_checkpointing(checkpointing)
        calls = []
        refiners = [blk.attn for blk, refine in zip(model.blocks, model.refiner_blocks) if refine]
        for conv in [attn.refine.expand.conv for attn in refiners] + [model.patch_embed.conv1.conv]:
            conv.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
        proj_calls = []  # the chunked stem's patchify conv runs as GEMMs (_PatchifyChunks), not through the module
        model.patch_embed.proj.register_forward_pre_hook(lambda m, args: proj_calls.append(args[0].shape[0]))
        dw_layouts = set()  # the chunked path runs the depthwise conv on channels-last maps (oneDNN's fast kernel)
        for attn in refiners:
            attn.refine.conv_dw.conv.register_forward_pre_hook(lambda m, args: dw_layouts.add(
                args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
        for _ in range(2):  # two steps: the running stats move twice
            model.zero_grad()
            out = model(x)
            out.square().mean().backward()
        assert set(calls) == ({5} if chunk == 0 else {2, 1})
        assert proj_calls == ([5, 5] if chunk == 0 else [])
        assert dw_layouts == {chunk > 0}
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        results.append((out.detach(), grads, buffers))
    _assert_same_training_steps(*results)


@pytest.mark.parametrize('act', ['relu', 'gelu'])
def test_cpu_chunked_training_step_equals_the_whole_batch_for_other_acts(act):
    """ The chunked path runs a clamping act (ReLU, ReLU6) in place and any other act out of place (models/refiner.py
    `_after_norm`): both give the whole batch's logits, gradients and running stats (float64). """
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    results = []
    for chunk in (0, 2):
        model = _tiny(cpu_chunk=chunk, refine_act_layer=act, conv_act_layer=act).double().train()
        out = model(x)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out.detach(), grads, {n: b.clone() for n, b in model.named_buffers()}))
    _assert_same_training_steps(*results)


def test_chunked_refinement_keeps_three_expanded_maps_per_chunk_for_backward():
    """ A CPU training step's refinement keeps, per chunk, the three expanded maps its backward reads: the expand
    GEMM's output after its ReLU6 (clamped in place, which the ReLU6's and the depthwise conv's backward both read),
    the depthwise conv's output (the norm's input) and the norm's output after its ReLU6 (clamped in place; the
    reduce GEMM's input). Out of place each ReLU6 would keep its input as well: five maps. """
    model = _tiny(cpu_chunk=2).train()
    attn = next(blk.attn for blk, refine in zip(model.blocks, model.refiner_blocks) if refine)
    hidden, heads, tokens = attn.refine.expand.conv.out_channels, attn.num_heads, 17
    prev = torch.softmax(torch.randn(4, heads, tokens, tokens), -1)
    map_numel = 2 * hidden * tokens * tokens  # one 2-image chunk's expanded map
    storages = set()

    def pack(t):
        if t.numel() == map_numel:
            storages.add(t.untyped_storage().data_ptr())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attn._forward_chunked(prev, torch.randn(4, heads, tokens, attn.head_dim), 2)
    assert len(storages) == 3 * 2
    out.sum().backward()  # the in-place acts left what backward needs intact (autograd checks the versions)


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('channels_last', [True, False])
def test_patchify_chunks_equal_the_patchify_conv(bias, channels_last):
    """ The chunked stem's patchify conv as GEMMs over patch rows (`_PatchifyChunks`, a non-square kernel here): the
    tokens and the input, weight and bias gradients of nn.Conv2d with kernel = stride over the whole batch (float64),
    the input gradients channels-last. """
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, kernel_size=(2, 3), stride=(2, 3), bias=bias).double()
    x = torch.randn(5, 6, 8, 9, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(5, 12, 10, dtype=torch.float64)
    ref_x = x.clone().requires_grad_()
    ref_tokens = conv(ref_x).flatten(2).transpose(1, 2)
    ref_tokens.backward(g)
    ref_grads = [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()
    chunks = [c.detach().requires_grad_() for c in x.split(2)]
    params = list(conv.parameters())
    tokens = refiner_module._PatchifyChunks.apply(conv.weight, conv.bias, *chunks)
    grads = torch.autograd.grad(tokens, chunks + params, g)  # as the function returns them (no leaf layout rule)
    chunk_grads, grads = grads[:len(chunks)], grads[len(chunks):]
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(chunk_grads), ref_x.grad, rtol=1e-12, atol=1e-12)
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert all(grad.is_contiguous(memory_format=torch.channels_last) for grad in chunk_grads)


def test_channels_last_refinement_equals_the_default_train_eval_and_folded():
    """ refine_channels_last (the default on CUDA, where it sends the depthwise conv to cuDNN): the refiners' convs
    run on channels-last maps, with the logits, every gradient and the running stats of the NCHW path, in a training
    step on the whole batch, in eval and after `reparameterize` folds the norms. """
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    results = []
    for channels_last in (False, True):
        model = _tiny(cpu_chunk=0, refine_channels_last=channels_last).double().train()
        layouts = []
        for blk, refine in zip(model.blocks, model.refiner_blocks):
            if refine:
                blk.attn.refine.conv_dw.conv.register_forward_pre_hook(lambda m, args: layouts.append(
                    args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
        out = model(x)
        out.square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        model.eval()
        with torch.no_grad():
            logits = model(x)
            timm.utils.reparameterize_model(model, inplace=True)
            folded = model(x)
        assert set(layouts) == {channels_last}
        results.append((out.detach(), grads, dict(model.named_buffers()), logits, folded))
    (out0, grads0, buf0, eval0, fold0), (out1, grads1, buf1, eval1, fold1) = results
    torch.testing.assert_close(out1, out0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads1, grads0, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(buf1, buf0, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(eval1, eval0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fold1, eval0, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(fold0, eval0, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize('channels_last', [False, True])
def test_image_stats_training_step_equals_the_default(channels_last):
    """ refine_image_stats (the default on CUDA, where aten's per-channel BatchNorm kernels leave the GPU idle on the
    refinement's 4-36 channel maps): every refinement norm takes its statistics and gradient sums per image and
    channel, then merges them; the logits, every gradient and the running stats of the plain path, over two steps.
    The reduce conv's output then goes NCHW, whatever the expanded maps' layout. """
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    results = []
    for image_stats in (False, True):
        model = _tiny(cpu_chunk=0, refine_channels_last=channels_last, refine_image_stats=image_stats).double()
        model.train()
        per_image = []
        original = refiner_module._norm_view

        def spy(t, flag):
            view, groups = original(t, flag)
            if flag:
                per_image.append(groups)
            return view, groups

        refiner_module._norm_view = spy
        try:
            for _ in range(2):
                model.zero_grad()
                out = model(x)
                out.square().mean().backward()
        finally:
            refiner_module._norm_view = original
        refiners = sum(model.refiner_blocks)
        if image_stats:
            # 4 norms a refiner, each viewed once in forward (statistics and normalisation) and once in backward, two
            # steps; the expanded maps' two norms per channel when channels-last
            assert len(per_image) == 2 * 2 * 4 * refiners
            assert per_image.count(1) == (2 * 2 * 2 * refiners if channels_last else 0)
            assert set(per_image) - {1} == {3}
        else:
            assert per_image == []
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers())))
    _assert_same_training_steps(*results)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA only: the default path of a CUDA training step')
@pytest.mark.parametrize('amp', [False, True])
def test_image_stats_on_cuda_equals_aten_batch_norm(amp, monkeypatch):
    """ On CUDA (where refine_image_stats defaults on, and aten's CUDA kernels run: its backward asserts that saved
    statistics are given): a training step with per-image statistics against aten's BatchNorm, float32 (TF32 off)
    and under bf16 autocast. Run it on a GPU with `python -m pytest tests/test_refiner.py -k cuda`. """
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    torch.manual_seed(1)
    x = torch.randn(8, 3, 32, 32, device='cuda')
    results = []
    for image_stats in (None, False):
        model = _tiny(cpu_chunk=0, refine_image_stats=image_stats).cuda().train()
        refiner = model.blocks[1].attn.refine
        assert refiner.use_image_stats(torch.empty(1, device='cuda')) == (image_stats is None)
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        out.float().square().mean().backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters()}
        results.append((out.float().detach(), grads, dict(model.named_buffers())))
    (out0, grads0, buf0), (out1, grads1, buf1) = results

    def err(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    running = [n for n in buf0 if n.endswith(('running_mean', 'running_var'))]
    assert max(err(buf0[n], buf1[n]) for n in running) < 1e-3
    assert all(g.isfinite().all() for g in grads1.values())
    if amp:  # bf16 gradients at init are mostly rounding (near-uniform maps) in either path: the logits only
        assert err(out0, out1) < 2e-2
    else:  # float32 rounding, amplified by the norms of near-uniform maps: 3e-6 to 3e-5 on CPU
        assert err(out0, out1) < 1e-3
        assert err(torch.cat([g.flatten() for g in grads0.values()]),
                   torch.cat([g.flatten() for g in grads1.values()])) < 1e-3


@pytest.mark.parametrize('channels, offset', [(36, 0.), (12, 0.), (36, 50.), (32, 0.)])
def test_chunked_batch_norm_of_channels_last_maps_is_batch_norm(channels, offset):
    """ batch_norm_chunks over channels-last chunks (the refiners' expanded maps and the stem's maps on CPU):
    outputs, input, weight and bias gradients and running stats of a training BatchNorm over the whole batch. Every
    pass runs on the chunks' (B*H, W*C) rows (`_norm_view`); in float32 they stay within 1e-4 of float64 also for maps
    whose mean is 50 standard deviations from zero. """
    torch.manual_seed(0)
    x = (offset + torch.randn(5, channels, 7, 7, dtype=torch.float64)).contiguous(memory_format=torch.channels_last)
    g = torch.randn(5, channels, 7, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    reference = nn.BatchNorm2d(channels).double()
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    ref_x = x.clone().requires_grad_()
    ref_out = reference(ref_x)
    ref_out.backward(g)
    groups = []
    original = refiner_module._norm_view

    def spy(*args):
        view, num_groups = original(*args)
        groups.append(num_groups)
        return view, num_groups
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        norm = nn.BatchNorm2d(channels).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(reference.weight)
            norm.bias.copy_(reference.bias)
        chunks = [c.to(dtype).requires_grad_() for c in x.split(2)]
        refiner_module._norm_view = spy
        try:
            outs = refiner_module.batch_norm_chunks(norm, chunks)
            torch.autograd.backward(outs, [c.to(dtype) for c in g.split(2)])
        finally:
            refiner_module._norm_view = original
        assert groups == [7] * 3 * 2  # three chunks: forward (statistics, normalisation), backward
        assert all(o.is_contiguous(memory_format=torch.channels_last) for o in outs)
        assert all(c.grad.is_contiguous(memory_format=torch.channels_last) for c in chunks)
        groups.clear()

        def close(ours, ref, name):
            err = ((ours.double() - ref).abs().max() / ref.abs().max()).item()
            assert err < tol, (name, dtype, err)
        close(torch.cat(outs), ref_out.detach(), 'output')
        close(torch.cat([c.grad for c in chunks]), ref_x.grad, 'input gradient')
        close(norm.weight.grad, reference.weight.grad, 'weight gradient')
        close(norm.bias.grad, reference.bias.grad, 'bias gradient')
        close(norm.running_var, reference.running_var, 'running var')


def test_per_image_batch_norm_of_unequal_chunks_is_batch_norm():
    """ batch_norm_chunks(per_image=True) over NCHW chunks of 2, 2 and 1 images: each chunk's statistics per image,
    its gradient passes with the per-channel values repeated once for the largest chunk and cut to each chunk's images
    (`group_prefix`). Outputs, gradients and running stats are a training BatchNorm's over the whole batch. """
    torch.manual_seed(0)
    x = 3 + torch.randn(5, 6, 9, 9, dtype=torch.float64)
    g = torch.randn(5, 6, 9, 9, dtype=torch.float64)
    reference = nn.BatchNorm2d(6).double()
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    norm = copy.deepcopy(reference)
    ref_x = x.clone().requires_grad_()
    ref_out = reference(ref_x)
    ref_out.backward(g)
    chunks = [c.clone().requires_grad_() for c in x.split(2)]
    outs = refiner_module.batch_norm_chunks(norm, chunks, per_image=True)
    torch.autograd.backward(outs, list(g.split(2)))
    torch.testing.assert_close(torch.cat(outs), ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([c.grad for c in chunks]), ref_x.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.weight.grad, reference.weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.bias.grad, reference.bias.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.running_mean, reference.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.running_var, reference.running_var, rtol=0, atol=1e-12)


def test_per_image_batch_norm_of_bfloat16_maps_keeps_float32_statistics():
    """ Under bf16 autocast the maps are bf16: the per-image norm keeps its statistics and gradient coefficients in
    float32 (as aten's CUDA BatchNorm does), so its outputs and input gradient stay as close to a float64 BatchNorm
    of the same bf16 maps as aten's own bf16 BatchNorm is (near-uniform maps, where bf16 statistics would cancel). """
    torch.manual_seed(0)
    x = (1 / 197 + 1e-4 * torch.randn(4, 6, 9, 9)).bfloat16()
    g = torch.randn(4, 6, 9, 9).bfloat16()
    norm = nn.BatchNorm2d(6)
    ref_x = x.double().requires_grad_()
    ref = F.batch_norm(ref_x, None, None, norm.weight.double(), norm.bias.double(), True, 0., norm.eps)
    ref.backward(g.double())
    ours_x = x.clone().requires_grad_()
    ours = refiner_module.batch_norm_chunks(norm, [ours_x], per_image=True)[0]
    ours.backward(g)
    assert ours.dtype == ours_x.grad.dtype == torch.bfloat16
    aten_x = x.clone().requires_grad_()
    aten = F.batch_norm(aten_x, None, None, norm.weight, norm.bias, True, 0., norm.eps)
    aten.backward(g)

    def err(a, b):
        return ((a.double() - b).norm() / b.norm()).item()
    assert err(ours, ref) < 1e-2 and err(ours, ref) <= 1.5 * err(aten, ref) + 1e-3
    grad_err, aten_grad_err = err(ours_x.grad, ref_x.grad), err(aten_x.grad, ref_x.grad)
    assert grad_err < 2e-2 and grad_err <= 1.5 * aten_grad_err + 1e-3


def test_batchnorm_eval_independent_of_batch():
    model = _tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-5, atol=1e-5)


def test_torchscript():
    model = _tiny().eval()
    x = torch.randn(1, 3, 32, 32)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_fx_trace():
    from timm.models import create_feature_extractor
    model = _tiny().eval()
    x = torch.randn(1, 3, 32, 32)
    extractor = create_feature_extractor(model, return_nodes=['blocks.1', 'norm'])
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)['norm'], model.forward_features(x))


def test_count_flops_counts_every_op():
    result = timm_hybrid.count_flops('refiner_vit_small_patch16_224', input_size=(3, 32, 32), **TINY)
    assert not result.unsupported
    # the refiner's convs on the attention maps and the map @ value products are counted
    assert result.by_operator.get('conv', 0) > 0 and result.by_operator.get('matmul', 0) > 0


def test_official_parity():
    state_dict, cfg, io = _official()
    model = timm.create_model('refiner_vit_small_patch16_224', aux_head=True, **cfg).eval()
    model.load_state_dict(checkpoint_filter_fn(state_dict, model))
    with torch.no_grad():
        assert (model(io['input']) - io['logits']).abs().max() < 1e-4
        assert (model.forward_features(io['input']) - io['features']).abs().max() < 1e-4


def test_official_checkpoint_through_timm_pretrained_loading():
    _, cfg, io = _official()
    model = timm.create_model(
        'refiner_vit_small_patch16_224', pretrained=True, aux_head=True,
        pretrained_cfg_overlay=dict(file=str(OFFICIAL_STATE_DICT), num_classes=cfg['num_classes']), **cfg).eval()
    with torch.no_grad():
        assert (model(io['input']) - io['logits']).abs().max() < 1e-4


@pytest.mark.parametrize('wrap', ['bare', 'module', 'state_dict', 'model', 'state_dict_ema'])
def test_filter_unwraps_checkpoints(wrap):
    state_dict, cfg, _ = _official()
    if wrap == 'module':
        state_dict = {f'module.{k}': v for k, v in state_dict.items()}
    elif wrap != 'bare':
        state_dict = {wrap: {f'module.{k}': v for k, v in state_dict.items()}, 'epoch': 3}
    model = timm.create_model('refiner_vit_small_patch16_224', aux_head=True, **cfg)
    model.load_state_dict(checkpoint_filter_fn(state_dict, model))


def test_filter_drops_aux_head_for_model_without_it(caplog):
    state_dict, cfg, io = _official()
    model = timm.create_model('refiner_vit_small_patch16_224', **cfg).eval()
    with caplog.at_level(logging.WARNING):
        model.load_state_dict(checkpoint_filter_fn(state_dict, model))
    assert 'aux_head=True' in caplog.text
    with torch.no_grad():
        assert (model.forward_features(io['input']) - io['features']).abs().max() < 1e-4


def test_filter_passes_own_checkpoints_through():
    model = _tiny()
    other = _tiny()
    torch.nn.init.normal_(other.blocks[1].attn.v.weight)
    model.load_state_dict(checkpoint_filter_fn(other.state_dict(), model))
    torch.testing.assert_close(model.blocks[1].attn.v.weight, other.blocks[1].attn.v.weight)


def test_filter_resamples_position_embedding():
    state_dict, cfg, _ = _official()  # 32 x 32 input, 8 x 8 grid
    model = timm.create_model('refiner_vit_small_patch16_224', aux_head=True, **dict(cfg, img_size=(48, 64))).eval()
    converted = checkpoint_filter_fn(state_dict, model)
    expected = resample_abs_pos_embed(state_dict['pos_embed'], new_size=[12, 16], num_prefix_tokens=1)
    torch.testing.assert_close(converted['pos_embed'], expected)
    model.load_state_dict(converted)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 64)).shape == (1, cfg['num_classes'])


@pytest.mark.parametrize('img_size', [48, (32, 80)])
def test_any_multiple_of_patch_size(img_size):
    model = _tiny(img_size=img_size).eval()
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    with torch.no_grad():
        assert model(torch.randn(1, 3, h, w)).shape == (1, 10)


@pytest.mark.parametrize('bad_input, message', [
    (torch.randn(3, 32, 32), '4D image batch'),
    (torch.randn(1, 1, 32, 32), 'in_chans=3'),
    (torch.randn(1, 3, 48, 32), r'img_size=\(48, 32\)'),
])
def test_bad_input_gives_clear_error(bad_input, message):
    with pytest.raises(AssertionError, match=message):
        _tiny()(bad_input)


def test_bad_img_size_gives_clear_error():
    with pytest.raises(ValueError, match='multiple of patch_size'):
        _tiny(img_size=34)


def test_reset_classifier_and_pre_logits():
    model = _tiny(aux_head=True).eval()
    x = torch.randn(1, 3, 32, 32)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, model.num_features)
    model.reset_classifier(5)
    assert model(x).shape == (1, 5) and model.aux_head.out_features == 5
    model.reset_classifier(0, 'avg')
    assert model(x).shape == (1, 32) and model.aux_head is None


def _released_refiner_attention(attn_module, x, prev_attn):
    """ The released RefinerAttention math written plainly: norm(map + inverted residual(map)) / sqrt(d) @ v. """
    B, N, C = x.shape
    refine = attn_module.refine
    v = attn_module.v(x).reshape(B, N, attn_module.num_heads, attn_module.head_dim).transpose(1, 2)
    refined = prev_attn + refine.reduce(refine.conv_dw(refine.expand(prev_attn)))
    attn = attn_module.norm(refined) * attn_module.scale
    return attn_module.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def _released_attention(attn_module, x, prev_attn):
    B, N, C = x.shape
    q, k, v = attn_module.qkv(x).reshape(B, N, 3, attn_module.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q @ k.transpose(-2, -1) * attn_module.scale).softmax(dim=-1) + prev_attn * attn_module.scale
    return attn_module.proj((attn @ v).transpose(1, 2).reshape(B, N, C)), attn


def _with_trained_norms(model):
    """ Non-trivial BatchNorm affine and running stats, so that folding them is tested for real. """
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, std=0.1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32))
    return model


@pytest.mark.parametrize('train', [False, True])
def test_block_attention_equals_released_math(train):
    """ The fast paths (map sum in one pass, 1/sqrt(d) on v instead of the map) against the released formulas:
    outputs and gradients (inputs and parameters), fp32. """
    model = _with_trained_norms(_tiny()).train(train)
    plain, refiner = model.blocks[0].attn, model.blocks[1].attn
    x = torch.randn(2, 65, 32, requires_grad=True)
    prev = torch.softmax(torch.randn(2, 4, 65, 65), -1).requires_grad_()
    for fast_fn, released_fn in (
            (lambda: plain(x, prev), lambda: _released_attention(plain, x, prev)),
            (lambda: refiner(x, prev)[0], lambda: _released_refiner_attention(refiner, x, prev))):
        results = []
        for fn in (fast_fn, released_fn):
            out = fn()
            out = torch.cat([o.flatten() for o in out]) if isinstance(out, tuple) else out.flatten()
            grads = torch.autograd.grad(out.square().sum(), [x, prev] + list(model.parameters()), allow_unused=True)
            results.append((out, grads))
        (out_fast, grads_fast), (out_released, grads_released) = results
        assert (out_fast - out_released).abs().max() < 1e-5
        for g_fast, g_released in zip(grads_fast, grads_released):
            if g_released is not None:
                # relative: BatchNorm over near-uniform maps makes the map gradients large (O(100))
                assert (g_fast - g_released).abs().max() <= 1e-5 * max(1., g_released.abs().max())


@pytest.mark.parametrize('norm_act', [False, True])
def test_reparameterize_folds_norms_with_equal_logits(norm_act):
    """ With timm's BatchNormAct2d as conv_norm_layer (an act that changes the maps: SiLU) the refined map's norm
    leaves its act after the folded affine (it was dropped until 2026-12-06). """
    from timm.utils import reparameterize_model
    conv_norm_layer = partial(timm.layers.BatchNormAct2d, act_layer=nn.SiLU) if norm_act else None
    model = _with_trained_norms(_tiny(aux_head=True, conv_norm_layer=conv_norm_layer)).eval()
    folded = reparameterize_model(model)
    refiner = folded.blocks[1].attn
    assert isinstance(refiner.norm, nn.SiLU if norm_act else nn.Identity)
    assert refiner.refine.shortcut_scale is not None
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.blocks.modules())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert (folded(x) - expected).abs().max() < 1e-5
        torch.testing.assert_close(torch.jit.script(folded)(x), expected, atol=1e-5, rtol=1e-5)
        twice = reparameterize_model(folded)
        assert (twice(x) - expected).abs().max() < 1e-5
    assert twice.state_dict().keys() == folded.state_dict().keys()  # idempotent


def test_reparameterized_official_weights_keep_official_logits():
    from timm.utils import reparameterize_model
    state_dict, cfg, io = _official()
    model = timm.create_model('refiner_vit_small_patch16_224', aux_head=True, **cfg).eval()
    model.load_state_dict(checkpoint_filter_fn(state_dict, model))
    with torch.no_grad():
        assert (reparameterize_model(model)(io['input']) - io['logits']).abs().max() < 1e-4


@pytest.mark.parametrize('num_rows, channels', [(38809, 36), (98, 12), (160, 8), (7, 5), (0, 3)])
def test_column_sums_are_the_sums_down_the_rows(num_rows, channels):
    """ column_sums (grouped rows, a remainder summed apart; the refiners' per-channel sums of narrow rows) is
    rows.sum(0), also for fewer rows than a group and for none; a non-contiguous matrix is summed as well. """
    rows = torch.randn(num_rows, channels, dtype=torch.float64)
    torch.testing.assert_close(refiner_module.column_sums(rows), rows.sum(0), rtol=1e-12, atol=1e-12)
    wide = torch.randn(num_rows, 2 * channels, dtype=torch.float64)[:, ::2]
    torch.testing.assert_close(refiner_module.column_sums(wide), wide.sum(0), rtol=1e-12, atol=1e-12)


def test_channel_moments_gradients_are_the_mean_and_covariances():
    """ _ChannelMoments (the expand norm's input statistics): the mean and the biased covariance of the channels over
    every chunk, and their gradients as autograd's through the plain formulas (gradcheck, float64, near-uniform maps
    as at init, and chunks of different sizes). """
    torch.manual_seed(0)
    chunks = [(1 / 49 + 1e-3 * torch.randn(b, 3, 7, 7, dtype=torch.float64)).requires_grad_() for b in (2, 1)]
    mean, cov = refiner_module._ChannelMoments.apply(*chunks)
    pixels = torch.cat([c.permute(0, 2, 3, 1).reshape(-1, 3) for c in chunks])
    torch.testing.assert_close(mean, pixels.mean(0), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(cov, torch.cov(pixels.t(), correction=0), rtol=1e-10, atol=1e-15)
    assert torch.autograd.gradcheck(lambda *c: refiner_module._ChannelMoments.apply(*c), chunks)


@pytest.mark.parametrize('per_image', [False, True])
def test_chunked_batch_norm_backward_hands_aten_a_weight(per_image):
    """ The gradient sums of `batch_norm_chunks` (`grouped_norm_grad_sums`) pass aten's BatchNorm backward a weight
    tensor even for a norm without one: aten's CUDA kernel allocates the weight gradient with the weight's options
    and fails on None, which the CPU kernel accepts (so only this check sees it without a GPU). """
    from torch.utils._python_dispatch import TorchDispatchMode
    weights = []

    class BackwardWeights(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.native_batch_norm_backward.default:
                weights.append(args[2])
            return func(*args, **(kwargs or {}))
    norm = nn.BatchNorm2d(4, affine=False)
    chunks = [torch.randn(2, 4, 5, 5).requires_grad_() for _ in range(2)]
    outs = refiner_module.batch_norm_chunks(norm, chunks, per_image=per_image)
    with BackwardWeights():
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    assert len(weights) == 2 and all(isinstance(w, torch.Tensor) for w in weights)
    assert all(c.grad is not None and c.grad.isfinite().all() for c in chunks)
