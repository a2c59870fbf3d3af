""" Refiner-ViT

'Refiner: Refining Self-attention for Vision Transformers' (Zhou et al., https://arxiv.org/abs/2106.03714). A ViT
whose attention maps are refined by convolutions: the H maps (B, H, N, N) of a block are treated as an H-channel
image over the (query, key) plane, expanded to more channels, convolved depthwise and reduced back.

As released (https://github.com/zhoudaquan/Refiner_ViT, models/refined_transformer.py @ b3e8cb0):

    image (B, 3, H, W)
      -> conv stem 7x7/2 (32) -> 3x3 (64) -> 3x3 (128), BN + ReLU each; (p/2)x(p/2) patchify conv to D
      -> [cls] + patch tokens + learned position embedding            tokens (B, 1 + N, D)
      depth x Block, alternating:
          even blocks  Attention         softmax(q k^T / sqrt(d)) (+ previous map / sqrt(d)) -> used on V, passed on
          odd blocks   RefinerAttention  previous map -> expand H -> 3H (1x1) -> depthwise 3x3 -> reduce 3H -> H (1x1)
                                         + previous map -> BN -> / sqrt(d) -> used on this block's V (no Q, K);
                                         the unrefined previous map is passed on
          MLP (ratio 3) with a per-channel scale (LayerScale, init 1e-5)
      -> LayerNorm -> class-token head (+ optional token-labelling aux head)

Where the released code differs from (or says more than) the paper's text:
- The paper describes refining the self-attention maps of the ViT's blocks (expand, convolve, reduce, then aggregate
  values with the refined maps). The released S / M / L refine only every other block, and there the map is the
  previous block's: odd blocks compute no query / key at all (a V-only projection), so their attention costs one
  (N x N) @ (N x d) product instead of two.
- The map handed on by a plain block is its softmax map plus 1/sqrt(d) times the map it received, so the maps of
  all earlier plain blocks feed every later one.
- The refined map is used as it comes out of BatchNorm and the 1/sqrt(d) scale, without a softmax: rows need not sum
  to one and entries may be negative.
- The refinement is a MobileNetV2-style inverted residual (1x1 + BN + ReLU6, depthwise 3x3 + BN + ReLU6, 1x1 + BN,
  identity shortcut) with expansion 3 for every size; the `head_expand=6` of the released S config reaches no layer.
- The convolutions run over the whole (1 + N) x (1 + N) map, class-token row and column included, with tokens in
  raster order: a 3x3 window spans neighbouring tokens of one image row (wrapping at row ends) and the class token,
  not a 2D spatial neighbourhood.
- Blocks normalise x / 2 and add twice the branch output (`adjust_ratio = 0.5` in the release): a residual gain of 2,
  kept here as `branch_gain`.
- The published parameter counts (25M / 55M / 81M) include the token-labelling aux head (a second 1000-way linear
  head on the patch tokens); without it the models have 25.0M / 55.0M / 80.6M.

Deviations here: MixToken and the token-labelling loss (training-time tricks in the released forward) are not
ported; the aux head is, so token-labelled checkpoints load and give the released eval logits (class head + 0.5 *
max over patch tokens of the aux head). Dropout follows timm's split (head / position / projection / attention)
instead of one `drop_rate` everywhere; all default to 0 as in the released configs.

`checkpoint_filter_fn` converts the released checkpoints (module and key names of the official code) and resamples
the position embedding to the model's grid.
"""
import logging
import math
import re
from functools import partial
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from timm.layers import (
    ConvNormAct, DropPath, LayerScale, Mlp, calculate_drop_path_rates, get_act_layer, get_norm_layer,
    to_2tuple, trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model

from ._common import (
    PatchGridEmbed, TokenClassifierMixin, batch_norm_grad_coefficients, bn_scale_shift, build_token_model,
    build_with_official_weights, check_int, check_ints, check_loaded_share, check_positive, check_token_model_args,
    conv2d_with, cpu_chunk_size, describe_layout, eager_on_cpu, group_prefix, grouped_affine, grouped_norm,
    grouped_norm_grad_sums, grouped_norm_input_grad, grouped_norm_stats, merge_group_stats, norm_act_remainder,
    norm_scale_shift, out_of_place, per_group, resample_token_pos, source_token_grid, token_model_cfg,
    unwrap_checkpoint, update_running_stats,
)

__all__ = ['RefinerViT', 'checkpoint_filter_fn']

_logger = logging.getLogger(__name__)


def _patch_rows(x: torch.Tensor, patch: Tuple[int, int]) -> torch.Tensor:
    """ (B, C, H, W) -> (B * H/ph * W/pw, ph * pw * C): each row one patch, pixel-major and channel-minor (one copy;
    from a channels-last `x` each patch row gathers ph runs of pw * C contiguous values). """
    (b, c, h, w), (ph, pw) = x.shape, patch
    return x.permute(0, 2, 3, 1).reshape(b, h // ph, ph, w // pw, pw, c).transpose(2, 3).reshape(-1, ph * pw * c)


class _PatchifyChunks(torch.autograd.Function):
    """ A conv whose kernel is its stride (no padding) over a batch held as chunks (B_i, C, H, W), as GEMMs over the
    patch rows: the tokens (B, N, D) of the whole batch.

    Why: oneDNN's backward of Refiner's 8x8 / 8 conv (128 -> 384 channels, 3-image slices of 112 x 112 maps, 2 threads)
    ran at about a third of the GEMM rate, 0.8 s of a 10.7 s training step; as GEMMs a slice's forward + backward took
    44 against 79 ms (scratch, median of 15). The forward is the same GEMM either way, so eval keeps the conv. The
    patch rows are rebuilt in backward instead of being kept (the maps themselves are kept by their ReLU anyway). """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, bias: Optional[torch.Tensor], *chunks: torch.Tensor) -> torch.Tensor:
        patch = tuple(weight.shape[-2:])
        matrix = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)  # (D, ph * pw * C), as the rows are
        parts = [_patch_rows(c, patch) for c in chunks]
        out = parts[0].new_empty(sum(r.shape[0] for r in parts), weight.shape[0])
        start = 0
        for rows in parts:
            target = out[start:start + rows.shape[0]]
            if bias is None:
                torch.mm(rows, matrix.t(), out=target)
            else:
                torch.addmm(bias, rows, matrix.t(), out=target)
            start += rows.shape[0]
        ctx.save_for_backward(matrix, *chunks)
        ctx.patch = patch
        return out.view(sum(c.shape[0] for c in chunks), -1, weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        matrix, *chunks = ctx.saved_tensors
        ph, pw = ctx.patch
        rows_grad = grad.reshape(-1, matrix.shape[0])
        grad_matrix = matrix.new_zeros(matrix.shape) if ctx.needs_input_grad[0] else None
        grad_chunks = []
        start = 0
        for x, needs_grad in zip(chunks, ctx.needs_input_grad[2:]):
            b, c, h, w = x.shape
            g = rows_grad[start:start + b * (h // ph) * (w // pw)]
            start += g.shape[0]
            if grad_matrix is not None:
                grad_matrix.addmm_(g.t(), _patch_rows(x, ctx.patch))
            grad_x = None
            if needs_grad:
                # the patch rows scattered back into their pixels (one copy), channels-last as the stem's maps
                grad_x = (g @ matrix).view(b, h // ph, w // pw, ph, pw, c).transpose(2, 3).reshape(b, h, w, c)
                grad_x = grad_x.permute(0, 3, 1, 2)
            grad_chunks.append(grad_x)
        grad_weight = None
        if grad_matrix is not None:
            grad_weight = grad_matrix.view(-1, ph, pw, matrix.shape[1] // (ph * pw)).permute(0, 3, 1, 2)
        grad_bias = rows_grad.sum(0) if ctx.needs_input_grad[1] else None
        return (grad_weight, grad_bias, *grad_chunks)


class ConvPatchEmbed(PatchGridEmbed):
    """ Image -> patch tokens (B, N, D) through a three-conv stem at stride 2 and a (p/2)x(p/2) patchify conv.

    The stem is LV-ViT's (itself after T2T-ViT): the 7x7 conv and two 3x3 convs see pixels across patch borders
    before the patches are cut.

    The stem runs channels-last (oneDNN's own layout on CPU: NCHW maps are reordered around every conv; cuDNN's
    tensor-core layout on GPUs) and, eager on CPU, a training step runs it on `cpu_chunk`-image slices with the batch
    statistics of the whole batch, as the refiners do: its 64- and 128-channel maps at 112 x 112 are 3.2 / 6.4 MB an
    image, far above malloc's mmap threshold at batch 32 (CPU_CHUNK_BYTES in models/_common.py). Same outputs and
    gradients within fp32 rounding; the measured effect is in the README. RefinerViT passes every size and layer (no
    defaults here: the model's are the only ones).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]],
            patch_size: Union[int, Tuple[int, int]],  # even: the stem runs at stride 2
            in_chans: int,
            embed_dim: int,
            stem_chs: Sequence[int],
            norm_layer: Type[nn.Module],
            act_layer: Type[nn.Module],
            cpu_chunk: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        if any(p % 2 for p in to_2tuple(patch_size)):
            raise ValueError(f'patch_size {to_2tuple(patch_size)} must be even (the stem runs at stride 2).')
        super().__init__(img_size, patch_size, in_chans)
        dd = {'device': device, 'dtype': dtype}
        conv_kwargs = dict(norm_layer=norm_layer, act_layer=act_layer, **dd)
        self.conv1 = ConvNormAct(in_chans, stem_chs[0], 7, stride=2, **conv_kwargs)
        self.conv2 = ConvNormAct(stem_chs[0], stem_chs[1], 3, **conv_kwargs)
        self.conv3 = ConvNormAct(stem_chs[1], stem_chs[2], 3, **conv_kwargs)
        half_patch = (self.patch_size[0] // 2, self.patch_size[1] // 2)
        self.proj = nn.Conv2d(stem_chs[2], embed_dim, kernel_size=half_patch, stride=half_patch, **dd)
        self.cpu_chunk = cpu_chunk  # see RefinerViT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        # channels-last on every path, not only where it was measured faster (eager CPU): an FX-traced model then runs
        # the eager model's convs and gives its outputs to the bit (timm's test_model_forward_fx asks that); scripted
        # and compiled models get the same layout
        x = x.contiguous(memory_format=torch.channels_last)
        if not torch.jit.is_scripting() and eager_on_cpu(x):
            chunk = self._train_chunk(x)
            if chunk:
                return self._forward_chunked(x, chunk)
        x = self.proj(self.conv3(self.conv2(self.conv1(x))))  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)

    @torch.jit.unused
    def _train_chunk(self, x: torch.Tensor) -> int:
        """ Images per slice for a CPU training step (0: the batch whole), sized by the stem's largest map. """
        if not self.training:
            return 0
        conv_norms = (self.conv1, self.conv2, self.conv3)
        return training_chunk_size(x, self.cpu_chunk, [c.bn for c in conv_norms], lambda: (
            max(c.conv.out_channels for c in conv_norms) * ((x.shape[-2] + 1) // 2) * ((x.shape[-1] + 1) // 2)
            * x.element_size()))  # conv1 runs at stride 2

    @torch.jit.unused
    def _forward_chunked(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """ The training forward on `chunk`-image slices, batch statistics of the whole batch. """
        maps = [self.conv1.conv(m) for m in x.split(chunk)]
        # each norm's act and the next conv chunk by chunk (CHUNK_MAJOR)
        maps = batch_norm_chunks(self.conv1.bn, maps, then=self.conv2.conv)
        maps = batch_norm_chunks(self.conv2.bn, maps, then=self.conv3.conv)
        maps = batch_norm_chunks(self.conv3.bn, maps)
        return _PatchifyChunks.apply(self.proj.weight, self.proj.bias, *maps)  # the patchify conv as GEMMs


class _MapAttention(nn.Module):
    """ Head layout and output projection shared by the two attentions, which both return (tokens, map). """

    def __init__(self, dim: int, num_heads: int, proj_drop: float = 0., device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}.')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)

    def _aggregate(self, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._project(self._attend(attn, v))

    def _attend(self, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """ The maps applied to the values, heads merged: (B, H, N, N), (B, H, N, d) -> (B, N, C). """
        B, _, N, _ = v.shape
        return (attn @ v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(x))


class Attention(_MapAttention):
    """ Multi-head self-attention that hands its map (B, H, N, N) on to the next block.

    The map is softmax(q k^T / sqrt(d)), plus the received map scaled by 1/sqrt(d) when there is one (released code).
    It is materialised because the next block needs it, so fused SDPA cannot be used.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__(dim, num_heads, proj_drop=proj_drop, device=device, dtype=dtype)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, x: torch.Tensor, prev_attn: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
        if prev_attn is not None:
            attn = torch.add(attn, prev_attn, alpha=self.scale)  # one pass over the maps, not a mul and an add
        attn = self.attn_drop(attn)
        return self._aggregate(attn, v), attn


class AttentionRefiner(nn.Module):
    """ Refines attention maps (B, H, N, N) as an H-channel image over the (query, key) plane.

    Expansion to more maps than heads is the paper's 'attention expansion' (more diverse maps); the depthwise conv
    is its 'distributed local attention'. Layout of a MobileNetV2 inverted residual, as released.

    `RefinerAttention.reparameterize` folds the norm that follows into the reduce conv and a per-head
    `shortcut_scale` of the map (one addcmul pass instead of an add and an affine).

    Speed (CPU, 2 threads, forward + backward of one refiner at batch 4, N = 197, interleaved, the whole batch): the
    convs as they are (oneDNN, NCHW) 629 ms; 1x1 convs as batched GEMMs 632 ms; the depthwise conv on a
    channels-last copy 705 ms (the two layout copies cost more than the conv saves); the depthwise conv as nine
    shifted multiply-adds 1368 ms (17 eager passes over the expanded maps). So the plain convs stay here. A CPU
    training step takes `RefinerAttention._forward_chunked` instead, which keeps the expanded maps channels-last
    with no copies (the 1x1 convs are GEMMs that change the layout on the way in and out). The ReLU6 and the
    refined map's BatchNorm each need the statistics of a whole map before anything after them can start, so in
    training nothing between the three convs folds; at eval everything linear folds (`reparameterize`).

    `channels_last` (None: on CUDA tensors) runs the three convs on a channels-last copy of the maps. PyTorch's CUDA
    convolution sends every channels-last depthwise convolution to cuDNN; an NCHW one goes to cuDNN only in fp16
    (by a table of shapes), so in bf16 or fp32 it runs PyTorch's own depthwise kernels, whose weight gradient gives
    each of the kernel's weights (324 for Refiner-S's 36 maps) a thread block of its own, reducing batch x N x N
    values: the likely cause of Refiner-S training at 0.04x DeiT-S on an H100 in bf16. Measured on an H200 (bf16,
    batch 256, `benchmarks/device_benchmark.py`): Refiner-S's training step runs 2.05x as fast channels-last as NCHW.
    On CPU the NCHW convs measured faster for the whole batch (above); a CPU training step takes the chunked path,
    channels-last inside whatever this says.

    `image_stats` (None: on CUDA tensors) trains the BatchNorms with statistics taken per image and channel, then
    merged (`forward_image_stats`): the same outputs, gradients and running statistics, from kernels that fill a GPU
    where aten's per-channel ones leave it idle (`_ChunkedBatchNorm`). Reasoned from the H200 profile, not yet timed;
    the device benchmark times `refine_image_stats=False` beside it.
    """

    def __init__(
            self,
            num_heads: int,
            expand_ratio: int = 3,
            kernel_size: int = 3,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            act_layer: Type[nn.Module] = nn.ReLU6,
            channels_last: Optional[bool] = None,
            image_stats: Optional[bool] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        self.channels_last = channels_last
        self.image_stats = image_stats
        hidden = num_heads * expand_ratio
        conv_kwargs = dict(norm_layer=norm_layer, act_layer=act_layer, device=device, dtype=dtype)
        self.expand = ConvNormAct(num_heads, hidden, 1, **conv_kwargs)
        self.conv_dw = ConvNormAct(hidden, hidden, kernel_size, groups=hidden, **conv_kwargs)
        self.reduce = ConvNormAct(hidden, num_heads, 1, apply_act=False, **conv_kwargs)
        self.register_buffer('shortcut_scale', None, persistent=False)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        maps = attn
        if not torch.jit.is_scripting() and self._use_channels_last(attn):
            maps = attn.contiguous(memory_format=torch.channels_last)  # the convs' outputs follow it
        refined = self.reduce(self.conv_dw(self.expand(maps)))  # (B, H, N, N) -> (B, eH, N, N) -> (B, H, N, N)
        shortcut_scale = self.shortcut_scale
        if shortcut_scale is None:
            return attn + refined  # in attn's (contiguous) layout, which the aggregation's matmul wants
        # contiguous: a no-op unless the convs ran channels-last, whose layout the aggregation's matmul would copy
        return torch.addcmul(refined, attn, shortcut_scale).contiguous()

    @torch.jit.unused
    def _use_channels_last(self, attn: torch.Tensor) -> bool:
        if self.channels_last is not None:
            return self.channels_last
        return not is_fx_symbolic_tracing() and attn.is_cuda  # a traced graph keeps the maps' layout

    @torch.jit.unused
    def use_image_stats(self, attn: torch.Tensor) -> bool:
        """ Whether a training forward of `attn` takes `forward_image_stats`: `image_stats`, or if None on CUDA
        tensors, eager (inductor writes its own BatchNorm kernels); only while every norm is a training BatchNorm. """
        if self.image_stats is False or not self.training or self.shortcut_scale is not None:
            return False
        if self.image_stats is None and (torch.compiler.is_compiling() or is_fx_symbolic_tracing()
                                         or torch.jit.is_tracing() or not attn.is_cuda):
            return False
        return training_batch_norms((self.expand.bn, self.conv_dw.bn, self.reduce.bn))

    @torch.jit.unused
    def forward_image_stats(self, attn: torch.Tensor) -> torch.Tensor:
        """ `forward` with every BatchNorm trained by `batch_norm_chunks(..., per_image=True)`: the same outputs,
        gradients and running statistics. Returns attn + refined maps, NCHW. """
        maps = attn.contiguous(memory_format=torch.channels_last) if self._use_channels_last(attn) else attn
        for conv_norm in (self.expand, self.conv_dw):
            maps = batch_norm_chunks(conv_norm.bn, [conv_norm.conv(maps)], per_image=True)[0]
        # the reduce conv's narrow output NCHW (one copy where the maps ran channels-last): its norm's statistics
        # per image then come from a (1, B * heads, N * N) view
        refined = self.reduce.conv(maps).contiguous()
        return attn + batch_norm_chunks(self.reduce.bn, [refined], per_image=True)[0]


def _fold_norm_into_conv(
        conv_norm: ConvNormAct,
        out_scale: Optional[torch.Tensor] = None,
        out_shift: Optional[torch.Tensor] = None,
) -> None:
    """ conv -> inference BatchNorm (-> act) -> optional per-channel affine (out_scale, out_shift) becomes one conv
    with a bias (-> act). """
    conv, bn = conv_norm.conv, conv_norm.bn
    scale, shift = bn_scale_shift(bn, conv.bias)
    assert scale is not None and shift is not None, 'The norm has been folded already.'
    if out_scale is not None and out_shift is not None:
        scale, shift = scale * out_scale, shift * out_scale + out_shift
    conv_norm.conv = conv2d_with(conv, conv.weight * scale.reshape(-1, 1, 1, 1), shift)
    conv_norm.bn = norm_act_remainder(bn)  # BatchNormAct2d carries the act


def _norm_view(x: torch.Tensor, per_image: bool) -> Tuple[torch.Tensor, int]:
    """ `x` as a BatchNorm input whose channels (dim 1) are `groups` repeats of x's C channels, and `groups`
    (the `grouped_norm*` passes of models/_common.py take such inputs):

    * `per_image` and x NCHW-contiguous: the (1, B*C, H*W) view, B groups (statistics per image and channel);
    * otherwise a CPU float32 / float64 channels-last x: its (B*H, W*C) rows, W groups. aten's CPU kernels then
      vectorize along whole rows, where on the map they vectorize along C: a refiner's 36-channel 197 x 197 map,
      statistics, normalisation and backward, 2 threads, 4.6 against 8.9 ms (aten on the map) and 7.1 ms (its
      earlier GEMM reductions); the stem's 3-image 112 x 112 slices 1.8 / 6.9 / 10.8 against 2.5 / 7.3 / 12.9 ms at
      32 / 64 / 128 channels (scratch, medians of 20);
    * else x itself, one group. """
    if per_image:
        if x.ndim == 4 and x.is_contiguous():
            return x.view(1, x.shape[0] * x.shape[1], -1), x.shape[0]
        return x, 1
    if (x.device.type == 'cpu' and x.dtype in (torch.float32, torch.float64) and x.ndim == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        b, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(b * h, w * c), w
    return x, 1


def _float_stats_input(view: torch.Tensor) -> torch.Tensor:
    """ `view` as the statistics kernel's input: float32 for a half-precision CPU view (aten's CPU kernel returns
    half-precision statistics of such maps, CUDA's float32). """
    return view.float() if view.dtype in (torch.float16, torch.bfloat16) and not view.is_cuda else view


def _as_norm_view(t: torch.Tensor, x: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """ `t`, shaped like `x`, in the layout of `view` = `_norm_view(x, ...)[0]` (a copy where t's layout differs). """
    if view is x:
        return t
    if view.ndim == 2:  # channels-last rows
        return t.permute(0, 2, 3, 1).reshape(view.shape)
    return t.contiguous().view(view.shape)


def _from_norm_view(out: torch.Tensor, x: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """ `out`, computed on `view` = `_norm_view(x, ...)[0]`, back in the shape of `x` (from channels-last rows: in
    x's layout). """
    if view is x:
        return out
    if view.ndim == 2:
        b, c, h, w = x.shape
        return out.view(b, h, w, c).permute(0, 3, 1, 2)
    return out.view(x.shape)


class _ChunkedBatchNorm(torch.autograd.Function):
    """ Training-mode batch norm of a batch held as chunks (B_i, C, H, W): the statistics and gradients of the whole
    batch, every tensor chunk-sized (see RefinerAttention). Returns the normalised chunks, then (mean, biased var).
    Each chunk's passes run on `_norm_view` (channels-last CPU chunks as rows).

    `per_image`: the statistics and gradient sums of each NCHW chunk are taken per image and channel, over a
    (1, B_i*C, H*W) view, and merged. aten's and cuDNN's CUDA BatchNorm kernels split the work by channel, so 12 or
    36 channels leave most of a GPU idle: in Refiner-S's training step on an H200 (bf16, batch 256) BatchNorm over the
    (256, 12 or 36, 197, 197) maps took 316 of 541 ms, one 12-channel backward 13.6 ms (about 35 GB/s). """

    @staticmethod
    def forward(ctx, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float, per_image: bool,
                *chunks: torch.Tensor):
        n = sum(c.numel() // c.shape[1] for c in chunks)
        views = [_norm_view(c, per_image) for c in chunks]
        # mean and biased var per chunk and group (BatchNorm's own statistics kernel, 3x faster than var_mean on
        # these maps on CPU), merged exactly: the maps are near-uniform at init, where E[x^2] - E[x]^2 would cancel
        stats = [grouped_norm_stats(_float_stats_input(view), groups) for view, groups in views]
        mean, var = merge_group_stats([m for m, _ in stats], [v for _, v in stats],
                                      [c.numel() // c.shape[1] // groups for c, (_, groups) in zip(chunks, views)])
        # float32 statistics for half-precision maps (as aten's CUDA BatchNorm keeps them)
        stat_dtype = torch.float32 if chunks[0].dtype in (torch.float16, torch.bfloat16) else chunks[0].dtype
        mean, var = mean.to(stat_dtype), var.to(stat_dtype)
        outs = []
        scale = shift = None  # repeated once for the largest groups (`group_prefix`)
        for c, (view, groups) in zip(chunks, views):  # one fused pass each
            if view.ndim == 2:  # channels-last rows: written into a fresh map (in place ops follow on the output)
                if scale is None:
                    scale, shift = per_group(max(g for _, g in views), *norm_scale_shift(mean, var, weight, bias, eps))
                out = torch.empty_like(c)
                grouped_affine(view, *group_prefix(view, scale, shift), out=_as_norm_view(out, c, view))
            else:
                out = grouped_norm(c, mean, var, weight, bias, eps, 1)
            outs.append(out)
        ctx.save_for_backward(weight, mean, var, *chunks)
        ctx.n, ctx.eps, ctx.per_image = n, eps, per_image
        ctx.mark_non_differentiable(mean, var)  # for the running stats only
        return (*outs, mean, var)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        weight, mean, var, *chunks = ctx.saved_tensors
        grads = grads[:len(chunks)]
        views = [_norm_view(c, ctx.per_image) for c in chunks]
        grad_views = [_as_norm_view(g, c, view) for g, c, (view, _) in zip(grads, chunks, views)]
        max_groups = max(groups for _, groups in views)
        inv_std = torch.rsqrt(var + ctx.eps)
        stats = per_group(max_groups, mean, var, inv_std)
        # sum(g) and sum(g * x_hat) per channel, one fused pass over each chunk
        sums = [grouped_norm_grad_sums(g, view, *group_prefix(view, *stats), ctx.eps, groups)
                for g, (view, groups) in zip(grad_views, views)]
        sum_gx, sum_g = (torch.stack(s).sum(0) for s in zip(*sums))
        # two passes a chunk (timm's / aten's training backward makes the same two: a reduction, then this); in the
        # statistics' precision, then the maps' (half-precision coefficients would cancel in b * x + c)
        w = torch.ones_like(mean) if weight is None else weight
        coefficients = per_group(max_groups, *batch_norm_grad_coefficients(w, mean, inv_std, sum_gx, sum_g, ctx.n))
        grad_chunks = [
            _from_norm_view(grouped_norm_input_grad(g, view, *group_prefix(view, *coefficients)), x, view).to(x.dtype)
            for g, x, (view, _) in zip(grad_views, chunks, views)]
        grad_weight = sum_gx if weight is not None and ctx.needs_input_grad[0] else None
        grad_bias = sum_g if ctx.needs_input_grad[1] else None
        return (grad_weight, grad_bias, None, None, *grad_chunks)


def batch_norm_chunks(
        norm: nn.Module,
        chunks: List[torch.Tensor],
        per_image: bool = False,
        then: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> List[torch.Tensor]:
    """ `norm` (a training BatchNorm2d, or timm's BatchNormAct2d with its act) over the batch that `chunks` split:
    the same outputs, gradients and running-stat update as on the concatenated batch. `per_image`: statistics per
    image first (`_ChunkedBatchNorm`), for GPUs. `then` runs on each chunk right after its act (CHUNK_MAJOR). """
    *outs, mean, var = _ChunkedBatchNorm.apply(norm.weight, norm.bias, norm.eps, per_image, *chunks)
    update_running_stats(norm, mean, var, sum(c.numel() // c.shape[1] for c in chunks))
    return _after_norm(norm, outs, then)


def _clamp_bounds(act: Optional[nn.Module]) -> Optional[Tuple[float, float]]:
    """ (low, high) of an act that clamps (ReLU, ReLU6, Hardtanh; exactly these classes), else None: the acts that
    the chunked paths run in place (`_ClampInPlace`). """
    if type(act) is nn.ReLU:
        return 0., math.inf
    if type(act) in (nn.ReLU6, nn.Hardtanh):
        return act.min_val, act.max_val
    return None


class _ClampInPlace(torch.autograd.Function):
    """ A clamping act (`_clamp_bounds`) in place, its gradient masked by its output, which is all it keeps for
    backward. autograd's own in-place hardtanh / clamp keep a clone of their input (one more map, one more pass);
    out of place a ReLU6 keeps its input while the op after it keeps its output. In Refiner-S's CPU training step
    the refiners' two ReLU6s so keep two of the five 36-channel maps an image held for backward out of memory:
    training peak 12890 -> 9899 MB at batch 32, the step 1.17x as fast with glibc's default malloc (fewer page
    faults) and 1.03x with `--malloc keep` (scratch A/Bs, 6 rounds; README, "Speed on CPU: the large maps"). """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bounds: Tuple[float, float]) -> torch.Tensor:
        return _clamp_keeping_output(ctx, x, bounds)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return _clamped_grad(ctx, grad), None


def _clamp_keeping_output(ctx, x: torch.Tensor, bounds: Tuple[float, float]) -> torch.Tensor:
    """ Forward of an autograd Function that clamps its input `x` in place and keeps the result for backward. """
    x.clamp_(*bounds)
    ctx.mark_dirty(x)
    ctx.save_for_backward(x)
    ctx.bounds = bounds
    return x


def _clamped_grad(ctx, grad: torch.Tensor) -> torch.Tensor:
    """ The gradient through a `_clamp_keeping_output` clamp: zero where its output sits at a bound (where its input
    was at or beyond it), as hardtanh's and ReLU's own backward (ReLU's passes an infinite output's gradient). """
    out, (low, high) = ctx.saved_tensors[0], ctx.bounds
    if high == math.inf:
        return torch.ops.aten.threshold_backward(grad, out, low)
    return torch.ops.aten.hardtanh_backward(grad, out, low, high)


def _after_norm(
        norm: nn.Module,
        outs: Iterable[torch.Tensor],
        then: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        act_applied: bool = False,
) -> List[torch.Tensor]:
    """ What timm's BatchNormAct2d applies after the normalisation (drop, act; nothing for a plain BatchNorm), then
    `then`, chunk by chunk (see CHUNK_MAJOR); `outs` may be a generator that makes each chunk when it is reached.
    `act_applied`: the caller has clamped the chunks already (`_clamp_bounds`; only where there is no drop).

    A clamping act runs in place on the fresh tensor of the norm or the drop before it (`_ClampInPlace`); other acts
    run out of place (timm builds them in place, where autograd may need their input). """
    tail = []
    drop, act = getattr(norm, 'drop', None), getattr(norm, 'act', None)
    if drop is not None:
        tail.append(drop)
    bounds = None if act_applied else _clamp_bounds(act)
    if bounds is not None:
        tail.append(lambda out: _ClampInPlace.apply(out, bounds))  # positional: Function.apply's own convention
    elif act is not None and not act_applied:
        tail.append(out_of_place(act))
    if then is not None:
        tail.append(then)
    finished = []
    for out in outs:
        for m in tail:
            out = m(out)
        finished.append(out)
    return finished


# CHUNK_MAJOR: a chunked path runs the ops between two norms chunk by chunk (each chunk through all of them, then the
# next), not op by op over all chunks: each op then reads the map the op before it has just written, still in the
# last-level cache, and autograd's backward, which runs the latest-made node first, follows the same order. Forward of a
# refiner's expand GEMM -> ReLU6 -> depthwise conv -> statistics over 32 one-image chunks: 70 against 139 ms op by op
# (scratch, 2 threads, no grad). Refiner-S's training step, scratch A/Bs in one process: about 1.05x from the stem's
# chains (3-image slices of 112 x 112 maps) and 1.02x from the refiners' (6-8 rounds each, spreads near 5%); with the
# patchify GEMMs and grouped sums, 1.042x in all (7 rounds). The norms' statistics need every chunk, so a chunk-by-chunk
# run stops at each norm.


# Chunks of the refinement are sized by the expanded maps one op touches at a time, not by one map: an op whose maps
# stay in the last-level cache (32 MiB here) runs at about twice the speed of one that streams them from memory (a
# depthwise 3x3 conv on 36 x 197^2 maps, forward + backward, 2 threads: 7.8 ms an image in 1-image chunks, 14.9 ms
# in 4-image ones). An eval op reads one map and writes another; a backward op reads the output's gradient and the
# saved input and writes the input's gradient. Measured, Refiner-S at batch 32 against DeiT-S, interleaved: eval
# 0.35x / 0.43x / 0.49x in chunks of 4 / 1 / 2 images; training step 0.335x in 4-image chunks, 0.362x in 1-image
# ones (the stem's chunks unchanged). With CPU_CHUNK_BYTES these give 2 (eval) and 1 (training) for Refiner-S.
EVAL_MAPS_PER_OP = 2
TRAIN_MAPS_PER_OP = 3


def training_batch_norms(norms: Sequence[nn.Module]) -> bool:
    """ Whether every one of `norms` is a BatchNorm in training mode: the norms that `batch_norm_chunks` can replace
    (its batch statistics and running-stat update are a training BatchNorm's). """
    return all(isinstance(n, nn.modules.batchnorm._BatchNorm) and n.training for n in norms)


@torch.jit.unused
def training_chunk_size(
        x: torch.Tensor,
        setting: Optional[int],
        norms: Sequence[nn.Module],
        per_sample_bytes: Callable[[], int],
) -> int:
    """ `cpu_chunk_size` for a training computation whose `norms` the chunked path replaces by `batch_norm_chunks`:
    0 (the batch whole) under CPU autocast or unless every one is a BatchNorm in training mode. """
    if torch.is_autocast_enabled('cpu'):
        return 0
    if not training_batch_norms(norms):
        return 0
    return cpu_chunk_size(x, setting, per_sample_bytes)


def column_sums(rows: torch.Tensor, group: int = 16) -> torch.Tensor:
    """ rows.sum(0) of a (R, C) matrix of narrow rows (C channels, channel-minor), summed down (R / group, group * C)
    rows first, then over the `group` partial sums of each channel.

    Why: aten's CPU sum over dim 0 vectorizes along the C columns, and a C that fills no whole vector (a refiner's 12
    or 36 channels) runs at a fraction of the speed of wide rows: (38809, 36), 2 threads, 0.58 against 0.10 ms
    (scratch). `group` = 16 makes every row a multiple of 16 floats (one AVX-512 vector). A remainder of fewer than
    `group` rows is summed on its own. """
    num_rows, channels = rows.shape
    head = num_rows - num_rows % group
    sums = rows[:head].reshape(head // group, group * channels).sum(0).view(group, channels).sum(0)
    return sums + rows[head:].sum(0) if head < num_rows else sums


class _ColumnBiasGrad(torch.autograd.Function):
    """ `out` (..., C), which already holds `bias` (added from a detached copy, e.g. by baddbmm's fused add), passed
    through as a view, or with `bounds` clamped in place as `_ClampInPlace` does (here, because no in-place op may
    follow on the view); `bias` gets its gradient as `column_sums` of out's. autograd's own reduction of the
    broadcast sums narrow rows slowly on CPU: 0.56 against 0.11 ms for a refiner's (38809, 36) map (scratch). """

    @staticmethod
    def forward(ctx, out: torch.Tensor, bias: torch.Tensor, bounds: Optional[Tuple[float, float]] = None):
        ctx.clamped = bounds is not None
        return _clamp_keeping_output(ctx, out, bounds) if ctx.clamped else out.view_as(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        if ctx.clamped:
            grad = _clamped_grad(ctx, grad)
        return grad, column_sums(grad.reshape(-1, grad.shape[-1])) if ctx.needs_input_grad[1] else None, None


class _ChannelMoments(torch.autograd.Function):
    """ Mean (C,) and biased covariance (C, C) of the channels of a batch held as NCHW chunks (B_i, C, H, W), the
    covariance from centred values (the maps are near-uniform at init, where E[a a^T] - mu mu^T would cancel). Keeps
    the mean and the chunks for backward (the conv that reads the chunks keeps them anyway): autograd through the
    same ops kept a centred copy of every chunk and made about six passes over it in backward, where this makes two
    and one GEMM. """

    @staticmethod
    def forward(ctx, *chunks: torch.Tensor):
        n = sum(c.numel() // c.shape[1] for c in chunks)
        mean = sum(c.sum((0, 2, 3)) for c in chunks) / n
        cov = 0.
        for c in chunks:
            centred = (c - mean.reshape(1, -1, 1, 1)).flatten(2)  # (b, C, H*W)
            cov = cov + torch.bmm(centred, centred.transpose(1, 2)).sum(0)
        ctx.save_for_backward(mean, *chunks)
        ctx.n = n
        return mean, cov / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean: torch.Tensor, grad_cov: torch.Tensor):
        mean, *chunks = ctx.saved_tensors
        # per pixel a: d/da of <G, cov> is (G + G^T)(a - mean) / n (the path through the mean adds nothing: the centred
        # values sum to zero), of <g, mean> g / n. One GEMM a chunk, the mean's part as its added bias
        symmetric = (grad_cov + grad_cov.t()) / ctx.n
        shift = (grad_mean / ctx.n).reshape(1, -1, 1)
        grads = []
        for c in chunks:
            centred = (c - mean.reshape(1, -1, 1, 1)).flatten(2)
            grads.append(torch.baddbmm(shift, symmetric.expand(c.shape[0], -1, -1), centred).view_as(c))
        return tuple(grads)


def pointwise_conv_norm_chunks(
        conv_norm: ConvNormAct,
        chunks: List[torch.Tensor],
        then: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> List[torch.Tensor]:
    """ A bias-free 1x1 conv and its training BatchNorm (and act) over the batch that `chunks` split, as one 1x1 conv
    with a bias: y = W a has the batch mean W mu and variances diag(W S W^T), where mu and S are the mean and covariance
    of the input's channels, so BN(W a) = (gamma / sigma) W a + beta - (gamma / sigma) W mu. The input's statistics
    (`_ChannelMoments`) cost one pass over its C channels (a centred copy and a C x C Gram matrix), where BatchNorm's
    statistics, normalisation and backward cost four over the conv's wider output; outputs, gradients and running stats
    are BatchNorm's (within rounding). The outputs are channels-last: each chunk's conv is one GEMM that reads the NCHW
    input transposed (no layout copy). `then` runs on each chunk's output right after it (CHUNK_MAJOR). """
    conv, norm = conv_norm.conv, conv_norm.bn
    n = sum(c.numel() // c.shape[1] for c in chunks)
    mean, cov = _ChannelMoments.apply(*chunks)
    weight = conv.weight.flatten(1)  # (C_out, C)
    out_mean, out_var = weight @ mean, ((weight @ cov) * weight).sum(1)
    scale, shift = norm_scale_shift(out_mean, out_var, norm.weight, norm.bias, norm.eps)
    update_running_stats(norm, out_mean, out_var, n)
    fused_t = (weight * scale[:, None]).t()  # (C, C_out)
    drop = getattr(norm, 'drop', None)
    # a clamping act runs in place on the GEMM's output, inside _ColumnBiasGrad
    bounds = _clamp_bounds(getattr(norm, 'act', None)) if drop is None or isinstance(drop, nn.Identity) else None

    def expanded() -> Iterator[torch.Tensor]:
        # (b, H*W, C) @ (C, C_out): pixel-major rows, i.e. the channels-last (b, C_out, H, W) map, on which the act
        # runs. The shift is added inside the GEMM; its gradient comes from _ColumnBiasGrad. A generator: each chunk's
        # GEMM runs when _after_norm reaches that chunk (CHUNK_MAJOR)
        for c in chunks:
            out = torch.baddbmm(shift.detach(), c.flatten(2).transpose(1, 2), fused_t.expand(c.shape[0], -1, -1))
            yield _ColumnBiasGrad.apply(out, shift, bounds).view(c.shape[0], *c.shape[2:], -1).permute(0, 3, 1, 2)

    return _after_norm(norm, expanded(), then, act_applied=bounds is not None)


def pointwise_conv_to_nchw(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """ A 1x1 conv of channels-last `x` with an NCHW output (the maps it is added to are NCHW). Computed as
    (b, H*W, C) @ (C, C_out) and transposed into place, so that backward hands `x`'s producer a channels-last gradient
    (with (C_out, C) @ (b, C, H*W) it would come NCHW, and BatchNorm's backward on mixed layouts is slower than the
    copy of the narrower output here). """
    b, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view of channels-last x
    y = torch.bmm(rows, conv.weight.flatten(1).t().expand(b, -1, -1)).transpose(1, 2).contiguous()
    if conv.bias is not None:
        y = y + conv.bias[:, None]
    return y.view(b, -1, h, w)


class RefinerAttention(_MapAttention):
    """ Attention with the previous block's map, refined: no query / key projection, only values.

    `refiner_layer(num_heads)` builds the refinement (an `AttentionRefiner`, or a partial of one with its expansion,
    kernel, norm, act and layout); `norm_layer` normalises the refined map.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            refiner_layer: Callable[..., nn.Module] = AttentionRefiner,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            cpu_chunk: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        super().__init__(dim, num_heads, proj_drop=proj_drop, device=device, dtype=dtype)
        self.cpu_chunk = cpu_chunk  # see RefinerViT
        dd = {'device': device, 'dtype': dtype}
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.refine = refiner_layer(num_heads, **dd)
        self.norm = norm_layer(num_heads, **dd)

    def forward(self, x: torch.Tensor, prev_attn: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        assert prev_attn is not None, 'A refiner block needs the attention map of a block before it.'
        B, N, C = x.shape
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)
        # the released (norm(map) / sqrt(d)) @ v, used without softmax; the scale goes on v, N / d times smaller
        if not torch.jit.is_scripting():
            chunk = self._train_chunk(prev_attn)
            if chunk:
                return self._forward_chunked(prev_attn, v, chunk), prev_attn
            if self._use_image_stats(prev_attn):
                attn = batch_norm_chunks(self.norm, [self.refine.forward_image_stats(prev_attn)], per_image=True)[0]
                return self._aggregate(attn, v * self.scale), prev_attn
        attn = self.norm(self.refine(prev_attn))  # (B, H, N, N)
        return self._aggregate(attn, v * self.scale), prev_attn

    @torch.jit.unused
    def _train_chunk(self, prev_attn: torch.Tensor) -> int:
        """ Images per chunk for a CPU training step (0: the batch whole): the refinement's maps, kept for backward,
        are the bulk of Refiner's training memory, and each one above 32 MiB is page-faulted in anew per step
        (CPU_CHUNK_BYTES in models/_common.py). """
        if not self.training or self.refine.shortcut_scale is not None:
            return 0
        norms = (self.refine.expand.bn, self.refine.conv_dw.bn, self.refine.reduce.bn, self.norm)
        return training_chunk_size(prev_attn, self.cpu_chunk, norms, lambda: (
            TRAIN_MAPS_PER_OP * prev_attn[0].numel() * self.refine.expand.conv.out_channels // self.num_heads
            * prev_attn.element_size()))

    @torch.jit.unused
    def _use_image_stats(self, prev_attn: torch.Tensor) -> bool:
        """ Whether a training step takes the refiner's `forward_image_stats` (a refiner of another kind: never). """
        use = getattr(self.refine, 'use_image_stats', None)
        return use is not None and use(prev_attn) and training_batch_norms((self.norm,))

    @torch.jit.unused
    def _forward_chunked(self, prev_attn: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
        """ The training forward on `chunk`-image slices of the maps, batch statistics of the whole batch. """
        maps = list(prev_attn.split(chunk))
        # the expanded maps channels-last, where oneDNN's depthwise conv runs about twice as fast forward and
        # backward as on NCHW ones; the 1x1 convs in and out are GEMMs that change the layout on the way. Between
        # the norms chunk by chunk (CHUNK_MAJOR)
        conv_dw, reduce = self.refine.conv_dw, self.refine.reduce
        refined = pointwise_conv_norm_chunks(self.refine.expand, maps, then=conv_dw.conv)
        refined = batch_norm_chunks(conv_dw.bn, refined, then=partial(pointwise_conv_to_nchw, reduce.conv))
        refined = batch_norm_chunks(reduce.bn, refined)
        attn = batch_norm_chunks(self.norm, [m + r for m, r in zip(maps, refined)])
        # each chunk's maps on its values, the projection once on the whole batch (one GEMM, not one a chunk)
        return self._project(torch.cat([self._attend(a, part) for a, part in zip(attn, (v * self.scale).split(chunk))]))

    @torch.jit.ignore
    def reparameterize(self) -> None:
        """ Folds the refiner's three inference-mode BatchNorms into their convs and the refined map's norm into the
        reduce conv and the shortcut: the refinement becomes conv -> ReLU6 -> depthwise conv -> ReLU6 -> conv +
        scale * map, three passes over the expanded maps and one over the refined ones (eager eval: seven, plus
        five over the refined maps). Called by timm's `reparameterize_model`; eval outputs are unchanged, the
        norms cannot train after. The act of a norm + act layer (timm's BatchNormAct2d as the refined map's norm)
        stays in the norm's place, after the folded affine. """
        if isinstance(self.norm, nn.Identity) or self.refine.shortcut_scale is not None:  # nothing to fold, or folded
            return
        norm_scale, norm_shift = bn_scale_shift(self.norm, None)
        _fold_norm_into_conv(self.refine.expand)
        _fold_norm_into_conv(self.refine.conv_dw)
        _fold_norm_into_conv(self.refine.reduce, norm_scale, norm_shift)
        self.refine.shortcut_scale = norm_scale.reshape(-1, 1, 1).detach().clone()
        self.norm = norm_act_remainder(self.norm)


class Block(nn.Module):
    """ Pre-norm transformer block carrying an attention map: (tokens, map) -> (tokens, map).

    `attn_layer(dim, num_heads=..., proj_drop=...)` builds the attention, as timm's ViT Block takes its `attn_layer`:
    `Attention` (a plain block) or `RefinerAttention` (a refiner block), bound to their own options.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            attn_layer: Callable[..., nn.Module] = Attention,
            mlp_ratio: float = 3.,
            init_values: float = 1e-5,
            branch_gain: float = 2.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        # the release normalises x * 0.5 and adds branch / 0.5; kept as a gain so released weights give its outputs
        self.branch_gain = branch_gain
        self.norm1 = norm_layer(dim, **dd)
        self.attn = attn_layer(dim, num_heads=num_heads, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        # per-channel scale on the MLP branch only (released `scale_channel`); the attention branch has none
        self.ls2 = LayerScale(dim, init_values=init_values, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, attn: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        gain = self.branch_gain
        y, attn = self.attn(self.norm1(x / gain), attn)
        x = x + self.drop_path1(y) * gain
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x / gain)))) * gain
        return x, attn


class RefinerViT(TokenClassifierMixin, nn.Module):
    """ Refiner-ViT (https://arxiv.org/abs/2106.03714), the released architecture; see the module docstring.

    | model    | embed / heads | depth | params (no aux head) | params with aux head (published) |
    | refiner_s | 384 / 12     | 16    | 25.0M                | 25.4M (25M)                      |
    | refiner_m | 420 / 12     | 32    | 55.0M                | 55.5M (55M)                      |
    | refiner_l | 512 / 16     | 32    | 80.6M                | 81.2M (81M)                      |

    Training memory grows with N^2 x 3H: the expanded maps of every refiner block are kept for backward. Measured on
    CPU (fp32) for the L dims at 448 (N = 785): about 0.95 GB per plain + refiner block pair per image, i.e. ~15 GB
    per image for refiner_vit_large_patch16_448 forward + backward; at 224 the maps are 16x smaller.

    Inputs and export as TokenClassifierMixin states; in training, the stem's and refiners' BatchNorm statistics
    spread a NaN / inf over the batch.

    Reduced precision: the refiners' BatchNorms normalise attention maps that at init are near-uniform (1/N +- ~1e-4/N),
    where bf16's rounding of 1/N is as large as the signal: under CPU autocast the logits are 1.4e-1 (bf16) / 2.6e-2
    (fp16) and the gradients up to 5.4e-1 / 4.6e-1 off fp32 (relative, tiny configs at init); with sharper maps
    (q / k weights x10) 1e-2 / 4e-2 in bf16. Prefer fp32 (or fp16 after warm-up) for the first steps.
    """

    group_stem = r'^cls_token|^pos_embed|^patch_embed'

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,  # even: the stem runs at stride 2
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 384,
            depth: int = 16,
            num_heads: int = 12,
            mlp_ratio: float = 3.,
            qkv_bias: bool = True,
            refiner_blocks: Optional[Sequence[bool]] = None,
            refine_expand: int = 3,
            refine_kernel_size: int = 3,
            init_values: float = 1e-5,
            branch_gain: float = 2.,
            stem_chs: Sequence[int] = (32, 64, 128),
            aux_head: bool = False,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Optional[Union[str, Type[nn.Module]]] = None,  # LayerNorm(eps=1e-6) as released
            act_layer: Optional[Union[str, Type[nn.Module]]] = None,
            conv_norm_layer: Optional[Union[str, Type[nn.Module]]] = None,
            conv_act_layer: Optional[Union[str, Type[nn.Module]]] = None,
            refine_act_layer: Optional[Union[str, Type[nn.Module]]] = None,
            refine_channels_last: Optional[bool] = None,
            refine_image_stats: Optional[bool] = None,
            cpu_chunk: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: Input image size, a multiple of patch_size.
            patch_size: Patch size (even: the conv stem runs at stride 2, the patchify conv at patch_size / 2).
            in_chans: Number of image channels.
            num_classes: Number of classes of the head (0 for no head).
            global_pool: 'token' (class token), 'avg' (mean of patch tokens) or '' (none).
            embed_dim: Token width.
            depth: Number of blocks.
            num_heads: Attention heads (also the channels of the attention maps the refiner convolves).
            mlp_ratio: MLP hidden ratio (released: 3).
            qkv_bias: Bias on the q / k / v projections (released: True).
            refiner_blocks: Per block, whether it is a refiner block; default alternates plain / refiner as
                released. The first block must be plain (a refiner block refines the map of the block before).
            refine_expand: Attention maps per head after the refiner's expansion (released: 3).
            refine_kernel_size: Kernel of the refiner's depthwise conv on the attention maps.
            init_values: Initial per-channel scale of the MLP branch.
            branch_gain: Blocks normalise x / gain and add gain * branch (released: 2).
            stem_chs: Channels of the three stem convs.
            aux_head: Add the token-labelling aux head; logits become head(cls) + 0.5 * max over patch tokens of
                aux_head(tokens), the released eval rule.
            drop_rate: Head dropout rate.
            pos_drop_rate: Dropout after the position embedding.
            proj_drop_rate: Dropout in the attention / MLP projections.
            attn_drop_rate: Attention-map dropout (plain blocks, as released).
            drop_path_rate: Stochastic depth rate (linearly increasing over blocks).
            norm_layer: Token norm layer (default LayerNorm, eps 1e-6).
            act_layer: MLP activation (default GELU).
            conv_norm_layer: Norm of the stem and the refiner convs (default BatchNorm2d).
            conv_act_layer: Stem activation (default ReLU).
            refine_act_layer: Refiner activation (default ReLU6).
            refine_channels_last: Run the refiners' convs on channels-last maps; None (default): on CUDA, where it
                sends the depthwise conv to cuDNN (AttentionRefiner). Same outputs either way.
            refine_image_stats: Train the refiners' BatchNorms with statistics taken per image first; None
                (default): on CUDA, where aten's per-channel kernels leave the GPU idle on 12-36 channel maps
                (AttentionRefiner). Same outputs, gradients and running statistics either way.
            cpu_chunk: On CPU, run a batch this many images at a time where the attention maps are large: the
                whole forward in eval, the refinements in a training step (batch statistics over the whole batch).
                None: as many as keep the expanded maps one op touches below 24 MiB (EVAL_MAPS_PER_OP,
                TRAIN_MAPS_PER_OP): 2 in eval and 1 in a training step for Refiner-S; 0: the batch whole.
                Same outputs and gradients; see `cpu_chunk_size` in models/_common.py for the measured reason.
        """
        super().__init__()
        check_token_model_args(
            img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate, proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate)
        check_int('refine_expand', refine_expand, 1)
        if check_int('refine_kernel_size', refine_kernel_size, 1) % 2 == 0:
            raise ValueError(f'refine_kernel_size must be odd (the map keeps its size), got {refine_kernel_size}.')
        check_ints('stem_chs', stem_chs, 1, length=3)
        check_positive('branch_gain', branch_gain)
        if refiner_blocks is None:
            refiner_blocks = [i % 2 == 1 for i in range(depth)]
        refiner_blocks = [bool(r) for r in refiner_blocks]
        if len(refiner_blocks) != depth:
            raise ValueError(f'refiner_blocks has {len(refiner_blocks)} entries for depth {depth}.')
        if depth and refiner_blocks[0]:
            raise ValueError('The first block cannot be a refiner block: there is no attention map to refine yet.')
        norm_layer = get_norm_layer(norm_layer) or partial(nn.LayerNorm, eps=1e-6)
        act_layer = get_act_layer(act_layer) or nn.GELU
        conv_norm_layer = get_norm_layer(conv_norm_layer) or nn.BatchNorm2d
        conv_act_layer = get_act_layer(conv_act_layer) or nn.ReLU
        refine_act_layer = get_act_layer(refine_act_layer) or nn.ReLU6
        dd = {'device': device, 'dtype': dtype}

        self._init_token_model(num_classes, in_chans, global_pool, embed_dim, num_prefix_tokens=1)
        self.refiner_blocks = refiner_blocks
        self.use_aux_head = aux_head
        self.cpu_chunk = None if cpu_chunk is None else check_int('cpu_chunk', cpu_chunk, 0)
        # the largest activations: the (expanded) attention maps of one image, H x expand x N x N
        self.refine_expand = refine_expand if any(refiner_blocks) else 1

        self.patch_embed = ConvPatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, stem_chs=stem_chs,
            norm_layer=conv_norm_layer, act_layer=conv_act_layer, cpu_chunk=self.cpu_chunk, **dd)
        self.num_patches = self.patch_embed.num_patches
        self._register_token_grid(device=device)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim, **dd))
        self.pos_drop = nn.Dropout(p=pos_drop_rate)

        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        plain_attn = partial(Attention, qkv_bias=qkv_bias, attn_drop=attn_drop_rate)
        refiner_attn = partial(
            RefinerAttention, qkv_bias=qkv_bias, norm_layer=conv_norm_layer, cpu_chunk=self.cpu_chunk,
            refiner_layer=partial(
                AttentionRefiner, expand_ratio=refine_expand, kernel_size=refine_kernel_size,
                norm_layer=conv_norm_layer, act_layer=refine_act_layer, channels_last=refine_channels_last,
                image_stats=refine_image_stats))
        self.blocks = nn.ModuleList([
            Block(
                embed_dim, num_heads, attn_layer=refiner_attn if refiner_blocks[i] else plain_attn,
                mlp_ratio=mlp_ratio, init_values=init_values, branch_gain=branch_gain, proj_drop=proj_drop_rate,
                drop_path=dpr[i], act_layer=act_layer, norm_layer=norm_layer, **dd)
            for i in range(depth)])
        self._init_head(norm_layer, drop_rate, reduction=max(self.patch_embed.patch_size), **dd)
        # token labelling's per-patch head of the released large model
        self.aux_head = self._new_head(num_classes, **dd) if aux_head and num_classes > 0 else None

        self.init_weights()

    def init_weights(self) -> None:
        # as released: trunc-normal(.02) linears and embeddings; convs and norms keep PyTorch's defaults
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'pos_embed', 'cls_token'}

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.aux_head = self._new_head(num_classes) if self.use_aux_head and num_classes > 0 else None

    def _token_grid(self) -> Tuple[int, int]:
        return self.patch_embed.grid_size

    @torch.jit.unused
    def _per_sample_activation_bytes(self) -> int:
        num_heads = self.blocks[0].attn.num_heads if len(self.blocks) else 1
        tokens = self.num_patches + self.num_prefix_tokens
        # the expanded maps (H x expand x N x N) an eval op holds at once: the one it reads and the one it writes
        return EVAL_MAPS_PER_OP * self.refine_expand * num_heads * tokens ** 2 * self.cls_token.element_size()

    def _input_embed(self) -> ConvPatchEmbed:
        return self.patch_embed

    def _resample_pos_embed(self, old_grid: Tuple[int, int]) -> None:
        self.pos_embed = nn.Parameter(resample_token_pos(
            self.pos_embed.detach(), old_grid, self.patch_embed.grid_size, self.num_prefix_tokens))

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """ Image -> (token sequence (B, 1 + N, D), no attention map yet: each block refines its predecessor's). """
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed), None

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        tokens = x
        x = self._pool(x)
        if pre_logits:
            return x
        x = self.head(x)
        if self.aux_head is not None and self.global_pool:
            # token labelling (LV-ViT): each patch token predicts the class; the released eval adds half the max
            x = x + 0.5 * self.aux_head(tokens[:, self.num_prefix_tokens:]).amax(dim=1)
        return x


# --- checkpoint conversion -------------------------------------------------------------------------------------------

# released (official) key fragments -> ours
_OFFICIAL_RENAMES = (
    (r'^patch_embed\.conv(\d)\.weight$', r'patch_embed.conv\1.conv.weight'),
    (r'^patch_embed\.bn(\d)\.', r'patch_embed.conv\1.bn.'),
    (r'\.attn\.DLA\.conv_exp\.', '.attn.refine.expand.conv.'),
    (r'\.attn\.DLA\.bn1\.', '.attn.refine.expand.bn.'),
    (r'\.attn\.DLA\.depth_sep_conv\.', '.attn.refine.conv_dw.conv.'),
    (r'\.attn\.DLA\.bn2\.', '.attn.refine.conv_dw.bn.'),
    (r'\.attn\.DLA\.conv_pro\.', '.attn.refine.reduce.conv.'),
    (r'\.attn\.DLA\.bn3\.', '.attn.refine.reduce.bn.'),
    (r'\.attn\.adapt_bn\.', '.attn.norm.'),
    (r'\.mlp\.scale_channel$', '.ls2.gamma'),
)


def _from_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # in refiner blocks the released `qkv` projects values only
    refiner_ids = {k.split('.')[1] for k in state_dict if k.startswith('blocks.') and '.attn.DLA.' in k}
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in _OFFICIAL_RENAMES:
            k = re.sub(pattern, repl, k)
        if k.startswith('blocks.') and k.split('.')[1] in refiner_ids:
            k = k.replace('.attn.qkv.', '.attn.v.')
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: RefinerViT) -> Dict[str, torch.Tensor]:
    """ Converts a released Refiner-ViT checkpoint (or one of these models) for `model`.

    Accepts a bare state dict or one wrapped in 'state_dict' / 'model' (EMA weights first, as timm's loader), with or
    without DataParallel's 'module.' prefix. Resamples the position embedding to the model's patch grid, and drops
    (or, if the checkpoint lacks it, keeps freshly initialised) the token-labelling aux head to match the model.
    """
    state_dict = unwrap_checkpoint(state_dict)
    layout = describe_layout(state_dict)
    if any('.attn.DLA.' in k or k.endswith('.mlp.scale_channel') for k in state_dict):
        state_dict = _from_official(state_dict)

    pos_embed = state_dict.get('pos_embed')
    if pos_embed is not None:
        num_prefix = model.num_prefix_tokens
        source_grid = source_token_grid(
            state_dict, model, pos_embed.shape[1] - num_prefix, model.patch_embed.patch_size)
        state_dict['pos_embed'] = resample_token_pos(pos_embed, source_grid, model.patch_embed.grid_size, num_prefix)
    state_dict['token_grid'] = model.token_grid  # what the position embedding is now resampled to
    model_state = model.state_dict()
    check_loaded_share(state_dict, model, layout, [
        k for k, v in state_dict.items() if k not in model_state or model_state[k].shape != v.shape])

    aux_keys = [k for k in state_dict if k.startswith('aux_head.')]
    if model.aux_head is None and aux_keys:
        _logger.warning(
            'Dropping the checkpoint\'s token-labelling aux head; create the model with aux_head=True to get the '
            'released eval logits (class head + 0.5 * max of the aux head over patch tokens).')
        for k in aux_keys:
            del state_dict[k]
    elif model.aux_head is not None and not aux_keys:
        _logger.warning('The checkpoint has no aux head; the model\'s aux_head keeps its fresh initialisation.')
        state_dict.update({f'aux_head.{k}': v for k, v in model.aux_head.state_dict().items()})
    return state_dict


# --- pretrained configs and entry points -----------------------------------------------------------------------------

def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return token_model_cfg(url, **{
        'first_conv': 'patch_embed.conv1.conv', 'classifier': 'head',
        'paper_ids': 'arXiv:2106.03714', 'paper_name': 'Refiner: Refining Self-attention for Vision Transformers',
        'origin_url': 'https://github.com/zhoudaquan/Refiner_ViT',
        'license': 'unknown',  # the official repository carries no LICENSE file
        **kwargs})


default_cfgs = generate_default_cfgs({
    # crop_pct as in the released default_cfgs; no released weights for these three
    'refiner_vit_small_patch16_224': _cfg(),
    'refiner_vit_medium_patch16_224': _cfg(crop_pct=1.0),
    'refiner_vit_large_patch16_224': _cfg(crop_pct=1.13),
    # the one released checkpoint, on Google Drive only (timm cannot download it): fetch it, then pass
    # pretrained_cfg_overlay=dict(file=<path>); `timm-hybrid publish --source` converts it for the hub
    'refiner_vit_large_patch16_448.in1k': _cfg(
        input_size=(3, 448, 448), crop_pct=1.0, classifier=('head', 'aux_head'),
        origin_url='https://drive.google.com/file/d/12v1WbxG6_mZQ0FYnXIhKiqbtg5bI4pGL/view?usp=sharing',
        notes=('Released ImageNet-1k top-1 86.0 (token labelling).',)),
})


# Each registered variant's constructor arguments (as timm's levit.py keeps its `model_cfgs`); a model function's
# kwargs override them.
_MODEL_ARGS = {
    'refiner_vit_small_patch16_224': dict(patch_size=16, embed_dim=384, depth=16, num_heads=12),
    'refiner_vit_medium_patch16_224': dict(patch_size=16, embed_dim=420, depth=32, num_heads=12),
    'refiner_vit_large_patch16_224': dict(patch_size=16, embed_dim=512, depth=32, num_heads=16),
    'refiner_vit_large_patch16_448': dict(
        img_size=448, patch_size=16, embed_dim=512, depth=32, num_heads=16, aux_head=True),
}


def _create_refiner(variant: str, pretrained: bool = False, **kwargs) -> RefinerViT:
    kwargs = dict(_MODEL_ARGS[variant], **kwargs)
    return build_token_model(
        RefinerViT, variant, pretrained, checkpoint_filter_fn, default_depth=16,
        builder=build_with_official_weights, **kwargs)


@register_model
def refiner_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> RefinerViT:
    """ Refiner-ViT-S: 16 blocks (8 refiner), 384 wide, 12 heads. """
    return _create_refiner('refiner_vit_small_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def refiner_vit_medium_patch16_224(pretrained: bool = False, **kwargs) -> RefinerViT:
    """ Refiner-ViT-M: 32 blocks (16 refiner), 420 wide, 12 heads. """
    return _create_refiner('refiner_vit_medium_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def refiner_vit_large_patch16_224(pretrained: bool = False, **kwargs) -> RefinerViT:
    """ Refiner-ViT-L: 32 blocks (16 refiner), 512 wide, 16 heads. """
    return _create_refiner('refiner_vit_large_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def refiner_vit_large_patch16_448(pretrained: bool = False, **kwargs) -> RefinerViT:
    """ Refiner-ViT-L at 448, with the token-labelling aux head its released weights were trained with. """
    return _create_refiner('refiner_vit_large_patch16_448', pretrained=pretrained, **kwargs)
