""" Convolution-iN-Transformer (CNT)

TNT ('Transformer in Transformer', https://arxiv.org/abs/2103.00112) keeps two streams: patch tokens (16x16 image
patches) mixed by an outer transformer, and for each patch a 4x4 grid of "pixel" embeddings mixed by an inner
transformer. CNT keeps the outer transformer (global attention between patches) and replaces the inner transformer by
a ResNet block run on each patch's pixel grid, i.e. convolution locally, attention globally.

    image (B, 3, H, W)
      -> pixel_embed: per-patch 7x7/4 conv           pixel stream (B*N, C_in, 4, 4), stored as tokens (B*N, 16, C_in)
      -> norm -> proj -> norm of the flattened grid   patch stream (B, prefix + N, D)
      12 x Block:
          pixel stream <- inner block                 ResNet basic / bottleneck block, or TNT's inner transformer
          patch tokens += norm(proj(norm(pixel grid flattened)))
          patch stream <- outer transformer block     timm's ViT block (fused attention)

`inner_block='attn'` with TNT's dimensions is TNT itself: `checkpoint_filter_fn` maps timm's TNT weights onto it and
the logits match timm's TNT. The same filter takes TNT or DeiT weights into any CNT for fine-tuning.

The patch and pixel position encodings are switchable ('learned', 'sincos' or 'none') for the proposal's ablation.
"""
import logging
import math
from functools import partial
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from timm.layers import (
    DropPath, build_sincos2d_pos_embed, calculate_drop_path_rates, get_act_layer, get_norm_layer, trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.vision_transformer import Block as TransformerBlock

from ._common import (
    ActRecomputingMlp, PatchGridEmbed, TokenClassifierMixin, batch_norm_grad_coefficients, bn_scale_shift,
    build_token_model, check_int, check_loaded_share, check_recompute_setting, check_token_model_args,
    checkpoint_keeping_bn_stats, conv_norm_eval, cpu_untraced, describe_layout, eager_backward_needs, eager_on_cpu,
    fold_conv_norm, grouped_norm, grouped_norm_grad_sums, grouped_norm_input_grad,
    grouped_norm_stats, has_running_stats, norm_act_remainder, out_of_place, per_group, recomputes, resample_token_pos,
    source_token_grid, summarize_keys, token_model_cfg, traced_or_compiling, unwrap_checkpoint, update_running_stats,
)
from .baselines import nano_cfg, packaged_weights

__all__ = ['CNT', 'CNTDistilled', 'InnerResBlock', 'checkpoint_filter_fn', 'conv3x3_as_matrix', 'create_inner_block']

_logger = logging.getLogger(__name__)

INNER_BLOCKS = ('basic', 'bottleneck', 'attn')
POS_EMBED_TYPES = ('learned', 'sincos', 'none')


class PixelEmbed(PatchGridEmbed):
    """ Image -> per-patch grid of pixel embeddings (B*N, C_in, h, w).

    As in TNT, each patch is convolved on its own (zero padding at the patch border), so a pixel embedding sees only
    its own patch. The patches are cut with a reshape instead of nn.Unfold (same values, no im2col copy). CNT passes
    every size (no defaults here: the model's are the only ones).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]],
            patch_size: Union[int, Tuple[int, int]],
            in_chans: int,
            inner_dim: int,
            stride: int,
            device=None,
            dtype=None,
    ):
        super().__init__(img_size, patch_size, in_chans)
        self.pixel_grid = (math.ceil(self.patch_size[0] / stride), math.ceil(self.patch_size[1] / stride))
        self.num_pixels = self.pixel_grid[0] * self.pixel_grid[1]
        self.proj = nn.Conv2d(in_chans, inner_dim, kernel_size=7, padding=3, stride=stride, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        B, C = x.shape[:2]
        gh, gw = self.grid_size
        ph, pw = self.patch_size
        x = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B * gh * gw, C, ph, pw)
        return self.proj(x)


def conv3x3_taps(pixel_grid: Tuple[int, int], device=None, dtype=None) -> torch.Tensor:
    """ The 0/1 tensor (9, h*w, h*w) of a zero-padded 3x3 convolution on an h x w grid.

    taps[t, q, p] = 1 where pixel q is under tap t = 3 * ky + kx of the kernel centred on pixel p (pixels row-major).
    Border pixels have fewer than nine taps: the missing ones are the zero padding.
    """
    h, w = pixel_grid
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    dy, dx = ys[:, None] - ys[None, :], xs[:, None] - xs[None, :]  # (q, p): offset of q from p
    tap = (dy + 1) * 3 + (dx + 1)
    near = (dy.abs() <= 1) & (dx.abs() <= 1)
    return torch.stack([near & (tap == t) for t in range(9)]).to(dtype or torch.get_default_dtype())


def conv3x3_as_matrix(weight: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """ A 3x3 kernel (C_out, C_in, 3, 3) -> the (h*w*C_in, h*w*C_out) matrix of its zero-padded convolution.

    A grid flattened pixel-major, channel-minor (the pixel tokens (B*N, h*w, C) as (B*N, h*w*C)) times this matrix
    is the convolution. Built from the kernel every step (a (h*w)^2 x 9 by 9 x C_in*C_out product), so gradients
    reach the kernel as through the convolution.
    """
    c_out, c_in = weight.shape[:2]
    num_pixels = taps.shape[1]
    matrix = torch.einsum('tqp,oit->qipo', taps, weight.flatten(2))
    return matrix.reshape(num_pixels * c_in, num_pixels * c_out)


class _PixelRowsBatchNorm(torch.autograd.Function):
    """ Training-mode BatchNorm of pixel rows (R, h*w*C), pixel-major and channel-minor: each channel's statistics
    over every row and pixel, as BatchNorm2d computes them on the (R, C, h, w) view. Each pass runs along whole rows
    (`grouped_norm_stats` and its kin in models/_common.py): the per-column statistics (one pass, aten's BatchNorm
    statistics kernel on the rows as a 2D batch), merged over each channel's h*w columns; the normalisation (one
    pass, an addcmul by per-channel scale and shift); in backward the sums of g and g * x_hat (one pass, aten's
    BatchNorm backward), then the input gradient (two). Keeps only its input for backward. Returns the batch mean and
    biased variance too (for the running statistics), without gradients. """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_pixels: int, eps: float):
        col_mean, col_var = grouped_norm_stats(rows, num_pixels)
        mean = col_mean.mean(0)
        var = (col_var + (col_mean - mean) ** 2).mean(0)  # every column has R values: the exact merge (Chan et al.)
        out = grouped_norm(rows, mean, var, weight, bias, eps, num_pixels)
        ctx.save_for_backward(rows, weight, mean, var)
        ctx.num_pixels, ctx.eps = num_pixels, eps
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_mean: torch.Tensor, _grad_var: torch.Tensor):
        rows, weight, mean, var = ctx.saved_tensors
        num_pixels = ctx.num_pixels
        inv_std = torch.rsqrt(var + ctx.eps)
        grad_weight, grad_bias = grouped_norm_grad_sums(
            grad_out, rows, *per_group(num_pixels, mean, var, inv_std), ctx.eps, num_pixels)
        grad_rows = None
        if ctx.needs_input_grad[0]:
            coefficients = batch_norm_grad_coefficients(
                weight, mean, inv_std, grad_weight, grad_bias, rows.shape[0] * num_pixels)
            grad_rows = grouped_norm_input_grad(grad_out, rows, *per_group(num_pixels, *coefficients))
        return grad_rows, grad_weight, grad_bias, None, None


def batch_norm_pixel_rows(rows: torch.Tensor, bn: nn.BatchNorm2d, num_pixels: int) -> torch.Tensor:
    """ `bn` in training mode on pixel rows (R, h*w*C), pixel-major and channel-minor (the GEMM form's output): the
    same outputs, gradients and running-statistics update as `bn` on the (R, C, h, w) channels-last view.

    Why: aten's CPU BatchNorm on a channels-last map vectorizes along the channels (16 fp32 lanes with AVX-512), so
    at 4 channels three quarters of each vector are empty: forward + backward on 6272 rows of 16 pixels x 4 channels
    took 4.9-8.5 ms there and 0.8-3.6 ms here (1 and 2 threads), and at 8 channels aten's backward slows down with
    2 threads. Here every pass runs along whole rows instead (`_PixelRowsBatchNorm`). At 8 channels, forward +
    backward on 6272 rows took 2.9-3.5 ms against aten's 8.9-9.1 ms on the channels-last view; at 16 aten's kernel
    was faster (3.1-4.4 against 3.8-5.0 ms), hence `CPU_ROW_NORM_MAX_CHANNELS` (2 threads, medians of 25).
    """
    num_channels = bn.num_features
    weight = bn.weight if bn.weight is not None else rows.new_ones(num_channels)
    bias = bn.bias if bn.bias is not None else rows.new_zeros(num_channels)
    out, mean, var = _PixelRowsBatchNorm.apply(rows, weight, bias, num_pixels, bn.eps)
    update_running_stats(bn, mean, var, rows.shape[0] * num_pixels)
    return out


INNER_IMPLS = ('auto', 'conv', 'matmul')
# On CPU, 'auto' takes the GEMM form when a convolution has fewer channels than this: one AVX-512 vector of fp32.
# oneDNN blocks channels by the vector width, so at 8 channels (CNT-Ti) half of each vector is padding and the GEMM,
# 16/9 the multiply-adds but full vectors, ran faster; at 16 (CNT-S) the convolution did (README, "How the inner
# block runs").
CPU_CONV_MIN_CHANNELS = 16
# The GEMM form's training BatchNorm runs on its output rows (`batch_norm_pixel_rows`) below this many channels. At 4
# (the micro models) aten's channels-last kernel took 7x as long for the norm and the micro CNT's training step ran
# 8-13% faster with the row form (0.90x -> 0.98-1.03x DeiT-micro, 1 thread, batch 128). At 8 (CNT-Ti), with 2 threads
# and the machine otherwise idle, aten's backward alone took 7.6 ms a call (12% of the training step, 24 calls) and
# forward + backward 7.7-8.4 ms against 2.6-3.0 ms as rows; with 1 thread 2.1-3.0 against 3.3 ms (6272 rows of 16
# pixels). At 16 the norm alone ran slower as rows (`batch_norm_pixel_rows`).
CPU_ROW_NORM_MAX_CHANNELS = 16


class InnerResBlock(nn.Module):
    """ A ResNet block (timm's BasicBlock or Bottleneck) applied to each patch's pixel grid.

    Tokens in and out: (B*N, h*w, C). The parameters are those of `conv_block`, a timm ResNet block, so checkpoints
    and the plain computation (`conv_block` on the (B*N, C, h, w) view) do not depend on `impl`:

    * 'conv': the convolutions on the channels-last view of the tokens (same memory, no copy). In inference the
      BatchNorms are folded into the convolutions (two passes over the pixel stream fewer per block). Fastest on CPU
      from 16 channels, where oneDNN runs the 3x3 convolutions on 4x4 grids well.
    * 'matmul': each 3x3 convolution as one (B*N, h*w*C_in) x (h*w*C_in, h*w*C_out) GEMM, the matrix built each step
      from the kernel (`conv3x3_as_matrix`); 1x1 convolutions as per-pixel GEMMs. It spends 16/9 of the convolution's
      multiply-adds (the matrix holds the zero padding), but a GEMM with K = N = 16*C (256 for CNT-S) is tensor-core
      shaped where cuDNN gets 3x3 convolutions on 4x4 maps with 16 channels. BatchNorm keeps its exact training
      statistics (on CPU below 16 channels along the GEMM's output rows, `batch_norm_pixel_rows`; else on the
      channels-last grid view) and folds into the matrix in inference.
    * 'auto': 'matmul' on accelerators; on CPU 'matmul' for convolutions narrower than `CPU_CONV_MIN_CHANNELS` (16,
      CNT-Ti's 8 channels) and 'conv' from there (CNT-S, CNT-B); 'conv' while traced (torch.jit.trace, which fvcore
      uses), so FLOPs are counted for the convolution the block defines, not for the zeros of its matrix. On an H200
      (bf16, batch 256) CNT-S ran 0.520x / 0.601x DeiT-S (inference / training step) as GEMMs and 0.556x / 0.578x
      as convolutions: a draw within the runs' spreads, so accelerators keep 'matmul' until a second run decides.

    Every implementation is held equal to the plain block by tests (outputs and gradients, train and eval).
    TorchScript runs the plain block.
    """
    folded_norms: FrozenSet[str] = frozenset()  # the norms `reparameterize` has folded into their convs

    def __init__(
            self,
            dim: int,
            pixel_grid: Tuple[int, int],
            drop_path: float = 0.,
            bottleneck: bool = False,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            impl: str = 'auto',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if impl not in INNER_IMPLS:
            raise ValueError(f"Unknown inner_impl '{impl}', expected one of {INNER_IMPLS}.")
        conv_kwargs = dict(
            act_layer=act_layer, norm_layer=norm_layer,
            drop_path=DropPath(drop_path) if drop_path > 0. else None, **dd)
        if bottleneck:
            # ResNet's 4x channel expansion: 1x1 to dim/4, 3x3 at dim/4, 1x1 back to dim
            if dim % Bottleneck.expansion:
                raise ValueError(f"inner_block='bottleneck' needs inner_dim divisible by 4, got {dim}.")
            self.conv_block = Bottleneck(dim, dim // Bottleneck.expansion, **conv_kwargs)
            self.stages = (('conv1', 'bn1', 'act1'), ('conv2', 'bn2', 'act2'), ('conv3', 'bn3', ''))
            self.out_act = 'act3'
        else:
            self.conv_block = BasicBlock(dim, dim, **conv_kwargs)
            self.stages = (('conv1', 'bn1', 'act1'), ('conv2', 'bn2', ''))
            self.out_act = 'act2'
        self.pixel_grid = pixel_grid
        if impl == 'matmul' and not self.norms_fold():
            raise ValueError("inner_impl='matmul' needs BatchNorm in the inner block (conv_norm_layer).")
        self.impl = impl
        self.narrowest_conv_channels = min(  # what 'auto' goes by on CPU
            min(c.in_channels, c.out_channels) for c in self.conv_block.modules() if isinstance(c, nn.Conv2d))
        self.register_buffer('taps', conv3x3_taps(pixel_grid, **dd), persistent=False)

    def init_weights(self, zero_init_last: bool = True) -> None:
        for m in self.conv_block.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        if zero_init_last:
            self.conv_block.zero_init_last()  # ResNet practice: each block starts as the identity

    @torch.jit.unused
    def norms_fold(self) -> bool:
        """ Every norm is a BatchNorm with running statistics (timm's BatchNormAct2d too) or already folded away:
        inference can fold it into the conv, and the GEMM form applies. Other norms (e.g. GroupNorm) run the plain
        block. """
        for _, bn_name, _ in self.stages:
            bn = getattr(self.conv_block, bn_name)
            if not (bn_name in self.folded_norms or isinstance(bn, nn.Identity) or has_running_stats(bn)):
                return False
        return True

    @torch.jit.unused
    def _folded_norm(
            self,
            bn_name: str,
            conv: nn.Conv2d,
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], List[nn.Module]]:
        """ A stage's inference norm as (scale, shift, acts): the per-channel affine that folds into `conv` (scale None
        where `reparameterize` has folded it already, the conv's bias the shift), then what the norm runs after its
        affine: the act of timm's norm + act layers (BatchNormAct2d; their dropout is a no-op in eval), or nothing. """
        bn = getattr(self.conv_block, bn_name)
        if bn_name in self.folded_norms or isinstance(bn, nn.Identity):
            return None, conv.bias, [] if isinstance(bn, nn.Identity) else [bn]  # what `reparameterize` left
        act = norm_act_remainder(bn)
        return (*bn_scale_shift(bn, conv.bias), [] if isinstance(act, nn.Identity) else [act])

    @torch.jit.unused
    def _impl_for(self, x: torch.Tensor) -> str:
        if torch.jit.is_tracing() or not self.norms_fold():
            return 'conv'
        if self.impl != 'auto':
            return self.impl
        if is_fx_symbolic_tracing():
            return 'conv'
        if x.device.type == 'cpu':
            return 'matmul' if self.narrowest_conv_channels < CPU_CONV_MIN_CHANNELS else 'conv'
        return 'matmul'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.forward_plain(x)
        impl = self._impl_for(x)
        if impl == 'matmul':
            return self._forward_matmul(x)
        if self.training or torch.jit.is_tracing() or not self.norms_fold():
            return self.forward_plain(x)
        return self._forward_conv_folded(x)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """ timm's ResNet block on the (B*N, C, h, w) channels-last view of the tokens: the reference. """
        BN, P, C = x.shape
        h, w = self.pixel_grid
        x = self.conv_block(x.reshape(BN, h, w, C).permute(0, 3, 1, 2))
        return x.permute(0, 2, 3, 1).reshape(BN, P, C)

    @torch.jit.unused
    def _forward_conv_folded(self, x: torch.Tensor) -> torch.Tensor:
        """ Inference: each conv with its BatchNorm folded in (`conv_norm_eval`: a norm that `reparameterize` has
        folded already, or what it left, runs as it is), on the channels-last view. """
        BN, P, C = x.shape
        h, w = self.pixel_grid
        shortcut = y = x.reshape(BN, h, w, C).permute(0, 3, 1, 2)
        for conv_name, bn_name, act_name in self.stages:
            y = conv_norm_eval(y, getattr(self.conv_block, conv_name), getattr(self.conv_block, bn_name))
            if act_name:
                y = getattr(self.conv_block, act_name)(y)
        drop_path = self.conv_block.drop_path
        if drop_path is not None:  # in eval it passes y on
            y = drop_path(y)
        out_act = getattr(self.conv_block, self.out_act)
        if self._relu_adds_in_one_pass(y, out_act):
            y = torch.ops.aten._add_relu_(y, shortcut)  # y: the last conv's fresh output
        else:
            y = out_act(y + shortcut)
        return y.permute(0, 2, 3, 1).reshape(BN, P, C)

    @staticmethod
    def _norms_pixel_rows(bn: nn.Module, out: torch.Tensor) -> bool:
        """ Whether the GEMM form normalises its output rows with `batch_norm_pixel_rows`: on CPU in fp32 / fp64,
        eager or compiled, for a plain BatchNorm2d (a subclass, e.g. SyncBatchNorm or timm's BatchNormAct2d, does more
        than the norm, so it runs itself) of fewer than `CPU_ROW_NORM_MAX_CHANNELS` channels. GPUs keep cuDNN's
        kernel: the row form is several launches. Inductor fuses the row form's passes too: CNT-Ti's compiled
        training step ran 1.04x as fast with it as with inductor's own BatchNorm (8 interleaved rounds, 2 threads),
        and since its per-channel values reach inductor as buffers (`per_group`) 0.892x DeiT-Ti's against 0.819x. FX
        and jit tracing record the module's own norm. """
        return (cpu_untraced(out) and type(bn) is nn.BatchNorm2d and bn.num_features < CPU_ROW_NORM_MAX_CHANNELS
                and bn.training and out.numel() > 0 and out.dtype in (torch.float32, torch.float64))

    def _conv_matrix(self, conv: nn.Conv2d) -> torch.Tensor:
        """ The GEMM form's matrix of `conv`: (C_in, C_out) for a 1x1 conv, applied per pixel to rows (B*N*h*w,
        C_in); (h*w*C_in, h*w*C_out) for a 3x3 one, per patch to rows (B*N, h*w*C_in). """
        if conv.kernel_size == (1, 1):
            return conv.weight.flatten(1).t()
        return conv3x3_as_matrix(conv.weight, self.taps)

    @torch.jit.unused
    def _forward_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """ Each conv as a GEMM on the flattened tokens; see the class docstring. """
        BN, P, C = x.shape
        h, w = self.pixel_grid
        shortcut = y = x.reshape(BN, P * C)
        if not self.training:
            return self._forward_matmul_folded(shortcut).reshape(BN, P, C)
        for conv_name, bn_name, act_name in self.stages:
            conv = getattr(self.conv_block, conv_name)
            bn = getattr(self.conv_block, bn_name)
            matrix = self._conv_matrix(conv)
            repeats = matrix.shape[1] // conv.out_channels  # output columns are (pixel, channel) pairs
            rows = y.reshape(y.numel() // matrix.shape[0], matrix.shape[0])  # sizes, not -1: B = 0 is allowed
            out = rows @ matrix if conv.bias is None else torch.addmm(*per_group(repeats, conv.bias), rows, matrix)
            if self._norms_pixel_rows(bn, out):
                out = batch_norm_pixel_rows(out.reshape(BN, P * conv.out_channels), bn, P)
            else:
                # batch statistics: the norm itself, on the channels-last (B*N, C, h, w) view of the GEMM's
                # output (CPU: 2.1x faster than on a (B*N*h*w, C, 1, 1) view, which takes the NCHW kernel)
                out = bn(out.reshape(BN, h, w, conv.out_channels).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            if act_name:
                y = self._act_on_rows(getattr(self.conv_block, act_name), out, (BN, P * conv.out_channels))
            else:
                y = out.reshape(BN, P * conv.out_channels)
        drop_path = self.conv_block.drop_path
        if drop_path is not None:
            y = drop_path(y)
        y = getattr(self.conv_block, self.out_act)(y + shortcut)
        return y.reshape(BN, P, C)

    @torch.jit.unused
    def _forward_matmul_folded(self, shortcut: torch.Tensor) -> torch.Tensor:
        """ Inference as GEMMs, tokens (B*N, h*w*C) in and out: each BatchNorm's scale folded into its conv's matrix,
        its shift the GEMM's bias (`addmm`: on GPUs cuBLASLt adds it in the GEMM's epilogue), then the norm's own act
        (BatchNormAct2d) and the block's. Where aten's `_add_relu_` runs (`_relu_adds_in_one_pass`) the shift and a
        ReLU take one pass over the GEMM's output instead, and the last GEMM starts from the shortcut, so the
        residual sum needs no pass of its own: two passes over the pixel stream fewer a basic block. CNT-Ti's inner
        block took 2.09 against 2.29 ms (eval, 6272 patches, 2 threads, medians of 200, scratch; README, "How the
        inner block runs"). """
        drop_path = self.conv_block.drop_path
        out_act = getattr(self.conv_block, self.out_act)
        y = shortcut
        for conv_name, bn_name, act_name in self.stages:
            conv = getattr(self.conv_block, conv_name)
            matrix = self._conv_matrix(conv)
            scale, shift, acts = self._folded_norm(bn_name, conv)
            scale, shift = per_group(matrix.shape[1] // conv.out_channels, scale, shift)
            if scale is not None:
                matrix = matrix * scale
            rows = y.reshape(y.numel() // matrix.shape[0], matrix.shape[0])  # sizes, not -1: B = 0 is allowed
            if act_name:
                y = self._gemm_then_acts(rows, matrix, shift, *acts, getattr(self.conv_block, act_name))
                continue
            # the last conv, then the shortcut (in eval DropPath passes its input on) and the block's act
            shortcut_rows = shortcut.reshape(rows.shape[0], matrix.shape[1])
            if (shift is not None and not acts and (drop_path is None or not drop_path.training)
                    and self._relu_adds_in_one_pass(rows, out_act)):
                return torch.ops.aten._add_relu_(torch.addmm(shortcut_rows, rows, matrix), shift).view(shortcut.shape)
            y = self._gemm_then_acts(rows, matrix, shift, *acts).view(shortcut.shape)
            y = (y if drop_path is None else drop_path(y)) + shortcut
        return out_act(y)

    @staticmethod
    def _relu_adds_in_one_pass(x: torch.Tensor, *acts: nn.Module) -> bool:
        """ Whether an add and `acts` after it can run as aten's `_add_relu_` on tensors computed from `x`: the acts
        are ReLUs (a ReLU after a ReLU changes nothing), eager on CPU in fp32 / fp64 without autocast (the op has no
        CUDA and no bf16 kernel), without autograd (it has no gradient). Tracers record the add and the act, which
        inductor fuses. """
        return (bool(acts) and all(type(act) is nn.ReLU for act in acts) and not torch.is_grad_enabled()
                and eager_on_cpu(x) and x.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled('cpu'))

    @classmethod
    def _gemm_then_acts(
            cls, rows: torch.Tensor, matrix: torch.Tensor, shift: Optional[torch.Tensor], *acts: nn.Module,
    ) -> torch.Tensor:
        """ The `acts` of rows @ matrix + shift: the shift as the GEMM's bias, or where `_relu_adds_in_one_pass`
        holds, added with the ReLU in one pass. The acts run in place where built so: the GEMM's output is fresh. """
        if shift is not None and cls._relu_adds_in_one_pass(rows, *acts):
            return torch.ops.aten._add_relu_(rows @ matrix, shift)
        out = rows @ matrix if shift is None else torch.addmm(shift, rows, matrix)
        for act in acts:
            out = act(out)
        return out

    @staticmethod
    def _act_on_rows(act: nn.Module, out: torch.Tensor, rows_shape: Tuple[int, int]) -> torch.Tensor:
        """ `act` of `out` as pixel rows: in place (timm's blocks build their ReLUs so) only on `out` itself, which
        has the rows' shape where the GEMM or the row BatchNorm wrote it. On a reshaped or permuted view autograd
        would record the in-place op as CopySlices, whose backward clones the gradient: a copy of the pixel stream
        and an as_strided pass a conv (48 of CNT-Ti's training step, about 7 ms of it on CPU). """
        if out.shape == rows_shape:
            return act(out)
        rows = out.reshape(rows_shape)
        # a copy of the module only where autograd records the op: not without grad, nor in a traced or compiled graph
        return out_of_place(act)(rows) if eager_backward_needs(rows) else act(rows)

    @torch.jit.ignore
    def reparameterize(self) -> None:
        """ Folds each inference-mode BatchNorm into its conv (conv gains a bias, the norm becomes Identity, or the
        act of a BatchNormAct2d): what timm's `reparameterize_model` calls. Outputs are unchanged in eval mode; the
        block cannot train BN after. A norm without running statistics (GroupNorm) stays as it is. """
        for conv_name, bn_name, _ in self.stages:
            conv = getattr(self.conv_block, conv_name)
            fused, remainder = fold_conv_norm(conv, getattr(self.conv_block, bn_name))
            if fused is conv:  # folded already (what is left has no running statistics), or a norm that cannot fold
                continue
            setattr(self.conv_block, conv_name, fused)
            setattr(self.conv_block, bn_name, remainder)
            self.folded_norms = self.folded_norms | {bn_name}


def inner_transformer(
        dim: int,
        pixel_grid: Tuple[int, int],
        drop_path: float = 0.,
        num_heads: int = 4,
        mlp_ratio: float = 4.,
        qkv_bias: bool = False,
        proj_drop: float = 0.,
        attn_drop: float = 0.,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        device=None,
        dtype=None,
) -> nn.Module:
    """ TNT's inner transformer over the h*w pixel tokens; timm's ViT block has its structure (qk and v fused). """
    return TransformerBlock(
        dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop,
        drop_path=drop_path, act_layer=act_layer, norm_layer=norm_layer, device=device, dtype=dtype)


def create_inner_block(
        kind: str = 'basic',
        impl: str = 'auto',
        conv_act_layer: Optional[Union[str, Type[nn.Module]]] = None,
        conv_norm_layer: Optional[Union[str, Type[nn.Module]]] = None,
        num_heads: int = 4,
        mlp_ratio: float = 4.,
        **attn_kwargs,
) -> Callable[..., nn.Module]:
    """ The inner block named by `kind` as the callable CNT takes: `fn(dim, pixel_grid, drop_path=..., **dd)`.

    'basic' / 'bottleneck': InnerResBlock (impl, conv_act_layer, conv_norm_layer apply); 'attn': TNT's inner
    transformer (num_heads, mlp_ratio and `attn_kwargs` such as qkv_bias, act_layer, norm_layer apply).
    """
    if kind in ('basic', 'bottleneck'):
        return partial(
            InnerResBlock, bottleneck=kind == 'bottleneck', impl=impl,
            act_layer=get_act_layer(conv_act_layer) or nn.ReLU,
            norm_layer=get_norm_layer(conv_norm_layer) or nn.BatchNorm2d)
    if kind == 'attn':
        return partial(inner_transformer, num_heads=num_heads, mlp_ratio=mlp_ratio, **attn_kwargs)
    raise ValueError(f"Unknown inner_block '{kind}', expected one of {INNER_BLOCKS}.")


def add_to_patch_tokens(tokens: torch.Tensor, patches: torch.Tensor, prefix: int) -> torch.Tensor:
    """ tokens (B, L, D) plus `patches` (B, L - prefix, D) on all but the first `prefix` tokens, out of place in one
    pass: a fresh tensor, the prefix tokens copied into it and the sum written into the rest by one add. An
    out-of-place index_add, which adds slice by slice, took 1.85x as long on CPU (2 threads, (32, 197, 192) and
    (32, 197, 384) tokens, scratch); zero-pad + add 2.5x and slice + add + concatenate 1.7x (CNT-S shapes). """
    out = torch.empty_like(tokens)
    out[:, :prefix] = tokens[:, :prefix]
    torch.add(tokens[:, prefix:], patches, out=out[:, prefix:])
    return out


class _AddToPatchTokens(torch.autograd.Function):
    """ `add_to_patch_tokens`, keeping nothing for backward. autograd's index_add keeps `patches` although its
    backward needs only their shape: one (B, N, D) tensor a block. CNT-S's training forward at batch 32 keeps 1958
    MB for backward with this add, 2068 MB with index_add (DeiT-S's 1896; counted with `saved_tensors_hooks`). """

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, patches: torch.Tensor, prefix: int) -> torch.Tensor:
        ctx.prefix = prefix
        return add_to_patch_tokens(tokens, patches, prefix)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return grad, grad[:, ctx.prefix:], None


class Block(nn.Module):
    """ One CNT stage: inner block on the pixel grids, pixel -> patch projection, outer transformer block.

    Two ways to hold less for backward in an eager training step, both giving the same outputs and gradients:

    * `recompute_mlp_act` (outer MLP, `ActRecomputingMlp`): fc2 keeps fc1's output instead of the GELU's, which
      backward recomputes. That is 39 MB a block at CNT-S shapes and batch 32, more than the whole pixel path keeps,
      for one elementwise pass. 'cpu' (the default): for CPU tensors only.
    * `recompute_pixels`: the pixel path (inner block, norm, projection, norm) keeps only its input for backward and
      runs again there (non-reentrant checkpoint, same RNG, BatchNorm running stats updated once): about 5
      pixel-stream tensors and a patch-width one a block, for a second forward of ~12% of the step's multiply-adds.
      False (the default): with the MLP recompute CNT-S already holds 1.04x DeiT-S's memory on CPU and runs its
      step faster than with this one (README, "Speed"); True everywhere, 'cpu' for CPU tensors only.

    torch.compile, FX and TorchScript run the plain path (inductor plans its own recomputation).
    """

    def __init__(
            self,
            dim: int,
            inner_dim: int,
            pixel_grid: Tuple[int, int],
            num_heads: int,
            inner_block: Callable[..., nn.Module],
            num_prefix_tokens: int = 1,  # class (+ distillation) token: the pixel path adds nothing to them
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,  # TNT's
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,  # the inner block's and the outer transformer's alike
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            recompute_pixels: Union[bool, str] = False,
            recompute_mlp_act: Union[bool, str] = 'cpu',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_pixels = pixel_grid[0] * pixel_grid[1]
        self.num_prefix_tokens = num_prefix_tokens
        self.recompute_pixels = check_recompute_setting('recompute_pixels', recompute_pixels)
        self.inner = inner_block(inner_dim, pixel_grid, drop_path=drop_path, **dd)
        self.norm1_proj = norm_layer(num_pixels * inner_dim, **dd)
        self.proj = nn.Linear(num_pixels * inner_dim, dim, bias=False, **dd)
        self.norm2_proj = norm_layer(dim, **dd)
        self.outer = TransformerBlock(
            dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
            attn_drop=attn_drop, drop_path=drop_path, act_layer=act_layer, norm_layer=norm_layer,
            mlp_layer=partial(ActRecomputingMlp, recompute_act=recompute_mlp_act), **dd)

    def pixel_path(self, pixel_embed: torch.Tensor, num_patches: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """ Pixel tokens (B*N, h*w, C_in) -> (new pixel tokens, their projection onto the patches (B, N, D)). """
        pixel_embed = self.inner(pixel_embed)
        # explicit sizes, not -1: a -1 is ambiguous for an empty batch (B = 0)
        pixels_per_patch = pixel_embed.reshape(
            pixel_embed.shape[0] // num_patches, num_patches, self.proj.in_features)  # (B, N, h*w*C_in)
        return pixel_embed, self.norm2_proj(self.proj(self.norm1_proj(pixels_per_patch)))

    @torch.jit.unused
    def _recomputed(self, pixel_embed: torch.Tensor) -> bool:
        return recomputes(self.recompute_pixels, self.training, pixel_embed)

    @torch.jit.unused
    def _pixel_path_recomputed(
            self, pixel_embed: torch.Tensor, num_patches: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return checkpoint_keeping_bn_stats(self, pixel_embed, num_patches, run=self.pixel_path)

    def forward(self, patch_embed: torch.Tensor, pixel_embed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        L = patch_embed.shape[1]
        num_patches = L - self.num_prefix_tokens
        if not torch.jit.is_scripting() and self._recomputed(pixel_embed):
            pixel_embed, pixel_to_patch = self._pixel_path_recomputed(pixel_embed, num_patches)
        else:
            pixel_embed, pixel_to_patch = self.pixel_path(pixel_embed, num_patches)
        pixel_to_patch = pixel_to_patch.to(patch_embed.dtype)
        if not torch.jit.is_scripting() and self._compiling():
            # Inductor writes an index_add as atomic adds and splits the next LayerNorm into passes around them;
            # slice + add + concatenate fuse with that norm. Compiled CNT-S, 2 threads, batch 32: 1.04x as fast in
            # inference and 1.07x per training step (README, "How the inner block runs").
            prefix = self.num_prefix_tokens
            patch_embed = torch.cat([patch_embed[:, :prefix], patch_embed[:, prefix:] + pixel_to_patch], dim=1)
        elif not torch.jit.is_scripting() and self._keeps_nothing_for_the_add(patch_embed, pixel_to_patch):
            patch_embed = self._add_keeping_nothing(patch_embed, pixel_to_patch)
        elif not torch.jit.is_scripting() and self._adds_without_graph(patch_embed, pixel_to_patch):
            patch_embed = add_to_patch_tokens(patch_embed, pixel_to_patch, self.num_prefix_tokens)
        else:
            # traced graphs and TorchScript: one op, no writes into slices; prefix tokens receive nothing
            patch_index = torch.arange(self.num_prefix_tokens, L, device=patch_embed.device)
            patch_embed = patch_embed.index_add(1, patch_index, pixel_to_patch)
        return self.outer(patch_embed), pixel_embed

    @torch.jit.unused
    def _keeps_nothing_for_the_add(self, patch_embed: torch.Tensor, pixel_to_patch: torch.Tensor) -> bool:
        """ Whether the pixel -> patch add takes `_AddToPatchTokens`: eager (not traced), when backward will run. """
        return eager_backward_needs(patch_embed, pixel_to_patch)

    @torch.jit.unused
    def _adds_without_graph(self, patch_embed: torch.Tensor, pixel_to_patch: torch.Tensor) -> bool:
        """ Whether the add takes `add_to_patch_tokens` as it is: eager, and autograd records nothing. """
        return not (traced_or_compiling() or eager_backward_needs(patch_embed, pixel_to_patch))

    @torch.jit.unused
    def _add_keeping_nothing(self, patch_embed: torch.Tensor, pixel_to_patch: torch.Tensor) -> torch.Tensor:
        return _AddToPatchTokens.apply(patch_embed, pixel_to_patch, self.num_prefix_tokens)

    @torch.jit.unused
    def _compiling(self) -> bool:
        return torch.compiler.is_compiling()


def _fixed_or_learned(
        kind: str,
        name: str,
        module: nn.Module,
        shape: Tuple[int, ...],
        sincos: Optional[torch.Tensor],
        device=None,
        dtype=None,
) -> None:
    """ Registers position encoding `name`: a learned parameter, a fixed (non-persistent) buffer, or None. """
    if kind not in POS_EMBED_TYPES:
        raise ValueError(f"Unknown {name} type '{kind}', expected one of {POS_EMBED_TYPES}.")
    if kind == 'learned':
        module.register_parameter(name, nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)))
    elif kind == 'sincos':
        module.register_buffer(name, sincos.reshape(shape).to(device=device, dtype=dtype), persistent=False)
    else:
        setattr(module, name, None)


class CNT(TokenClassifierMixin, nn.Module):
    """ Convolution-iN-Transformer.

    TNT's outer transformer between patches, a ResNet block inside each patch. Dims of the registered sizes, chosen so
    that fvcore GMACs at 224 (attention matmuls included) stay at or below TNT's and params within 5% of TNT's:

    | model | embed / heads | inner_dim | TNT inner_dim | why |
    | cnt_ti | 192 / 3 | 8  | 12 | a basic block costs 18*C^2 MACs per pixel vs 12*C^2 + 32*C for TNT's inner
    |        |         |    |    | transformer, so C drops; a smaller C also shrinks every block's pixel->patch proj |
    | cnt_s  | 384 / 6 | 16 | 24 | as above; 16 rather than the 20 the budget allows: C a multiple of 8 for bf16 |
    |        |         |    |    | tensor cores (16*C = 256 for the GEMM form), 4.99 vs 5.16 GMACs, params -2.8% |
    | cnt_b  | 640 / 10| 32 | 40 | as above |

    The measured figures are in the README (benchmarks/cnt_speed.py, `timm-hybrid compare`).

    Inputs and export as TokenClassifierMixin states; in training, the inner blocks' BatchNorm statistics spread a
    NaN / inf over the batch. CPU autocast (bf16 / fp16) stays within 1e-2 / 1e-3 of fp32 (relative, logits and
    gradients).
    """

    group_stem = r'^cls_token|^dist_token|^patch_pos|^pixel_pos|^pixel_embed|^norm[12]_proj|^proj'

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 384,
            inner_dim: int = 16,
            depth: int = 12,
            num_heads: int = 6,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            inner_block: Union[str, Callable[..., nn.Module]] = 'basic',
            inner_block_args: Optional[Dict[str, Any]] = None,
            patch_pos_embed: str = 'learned',
            pixel_pos_embed: str = 'learned',
            first_stride: int = 4,
            dist_token: bool = False,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Optional[Union[str, Type[nn.Module]]] = None,
            act_layer: Optional[Union[str, Type[nn.Module]]] = None,
            zero_init_last: bool = True,
            recompute_pixels: Union[bool, str] = False,
            recompute_mlp_act: Union[bool, str] = 'cpu',
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: Input image size, a multiple of patch_size (TNT's patches, cut before any convolution).
            patch_size: Patch size of the outer (patch) tokens.
            in_chans: Number of image channels.
            num_classes: Number of classes of the head (0 for no head).
            global_pool: 'token' (class token), 'avg' (mean of patch tokens) or '' (none).
            embed_dim: Width of the patch tokens (outer transformer).
            inner_dim: Channels of the pixel embeddings (inner block).
            depth: Number of blocks.
            num_heads: Heads of the outer attention.
            mlp_ratio: Outer MLP hidden ratio.
            qkv_bias: Bias on the qkv projections (TNT: False).
            inner_block: The block that mixes each patch's pixel embeddings, as a callable
                `fn(inner_dim, pixel_grid, drop_path=..., device=..., dtype=...)` mapping (B*N, h*w, C_in) tokens to
                the same shape (as timm's ViT takes `block_fn`), e.g. `create_inner_block('bottleneck', impl='conv')`
                or `partial(InnerResBlock, act_layer=nn.SiLU)`. A name ('basic' ResNet basic block, 'bottleneck',
                'attn' TNT's inner transformer) is a shortcut for `create_inner_block(name, **inner_block_args)`
                with this model's qkv_bias, dropout, act and norm layers.
            inner_block_args: Options of a named inner_block (`create_inner_block`): impl ('auto' / 'conv' /
                'matmul'), conv_act_layer, conv_norm_layer; num_heads, mlp_ratio for 'attn'. The model functions
                take them as inner_impl, conv_act_layer, conv_norm_layer, inner_num_heads, inner_mlp_ratio.
            patch_pos_embed: Position encoding of the patch sequence: 'learned', 'sincos' (fixed 2D, zero on prefix
                tokens) or 'none'.
            pixel_pos_embed: Position encoding of the pixel grid: 'learned', 'sincos' or 'none'.
            first_stride: Stride of the pixel embedding conv (patch_size / first_stride pixels per patch side).
            dist_token: Add a DeiT distillation token (use CNTDistilled for the distillation head).
            drop_rate: Head dropout rate.
            pos_drop_rate: Dropout after the position embedding.
            proj_drop_rate: Dropout in the attention / MLP projections.
            attn_drop_rate: Attention dropout.
            drop_path_rate: Stochastic depth rate (linearly increasing over blocks, inner and outer).
            norm_layer: Token norm layer (default nn.LayerNorm, as TNT).
            act_layer: Transformer MLP activation (default GELU).
            zero_init_last: Zero-init the last norm of each inner conv block (ResNet practice), so that each block
                starts close to identity.
            recompute_pixels: In eager training, recompute each block's pixel path in backward instead of keeping
                its activations (same outputs and gradients; see Block). False (default) keeps them; True
                recomputes; 'cpu' recomputes for CPU tensors only.
            recompute_mlp_act: In eager training, recompute each outer MLP's activation in backward instead of
                keeping its output (`ActRecomputingMlp`, same outputs and gradients). 'cpu' (default): CPU only,
                where it keeps CNT-S's training-step memory at 1.04x DeiT-S's (1.22x without; batch 32).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        check_token_model_args(
            img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate, proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate)
        check_int('inner_dim', inner_dim, 1)
        check_int('first_stride', first_stride, 1)
        norm_layer = get_norm_layer(norm_layer) or nn.LayerNorm
        act_layer = get_act_layer(act_layer) or nn.GELU
        if isinstance(inner_block, str):
            inner_block = create_inner_block(
                inner_block, **(inner_block_args or {}), qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, act_layer=act_layer, norm_layer=norm_layer)
        elif inner_block_args:
            raise ValueError('inner_block_args apply to a named inner_block; bind options into the callable instead.')

        self._init_token_model(num_classes, in_chans, global_pool, embed_dim, num_prefix_tokens=2 if dist_token else 1)
        self.inner_dim = inner_dim

        self.pixel_embed = PixelEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, inner_dim=inner_dim, stride=first_stride,
            **dd)
        self.num_patches = num_patches = self.pixel_embed.num_patches
        self._register_token_grid(device=device)
        pixel_grid = self.pixel_embed.pixel_grid
        num_pixels = self.pixel_embed.num_pixels

        self.norm1_proj = norm_layer(num_pixels * inner_dim, **dd)
        self.proj = nn.Linear(num_pixels * inner_dim, embed_dim, **dd)
        self.norm2_proj = norm_layer(embed_dim, **dd)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if dist_token else None

        _fixed_or_learned(
            patch_pos_embed, 'patch_pos', self, (1, self.num_prefix_tokens + num_patches, embed_dim),
            self._patch_sincos() if patch_pos_embed == 'sincos' else None, **dd)
        pixel_sincos = None
        if pixel_pos_embed == 'sincos':
            pixel_sincos = build_sincos2d_pos_embed(list(pixel_grid), inner_dim).t()  # (C_in, h*w)
        _fixed_or_learned(pixel_pos_embed, 'pixel_pos', self, (1, inner_dim, *pixel_grid), pixel_sincos, **dd)
        self.pos_drop = nn.Dropout(p=pos_drop_rate)

        dpr = calculate_drop_path_rates(drop_path_rate, depth)  # block i's inner and outer branch share dpr[i]
        self.blocks = nn.ModuleList([
            Block(
                embed_dim, inner_dim, pixel_grid, num_heads, inner_block, num_prefix_tokens=self.num_prefix_tokens,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[i], act_layer=act_layer, norm_layer=norm_layer, recompute_pixels=recompute_pixels,
                recompute_mlp_act=recompute_mlp_act, **dd)
            for i in range(depth)])
        self._init_head(norm_layer, drop_rate, reduction=self.pixel_embed.feat_ratio(), **dd)
        self.init_weights(zero_init_last=zero_init_last)

    def init_weights(self, zero_init_last: bool = True) -> None:
        for name in ('cls_token', 'dist_token', 'patch_pos', 'pixel_pos'):
            param = getattr(self, name)
            if isinstance(param, nn.Parameter):
                trunc_normal_(param, std=.02)
        self.apply(_init_weights)
        for m in self.modules():
            if isinstance(m, InnerResBlock):
                # ResNet's init for the inner convs; the pixel embedding conv keeps PyTorch's default, as in TNT
                m.init_weights(zero_init_last=zero_init_last)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # the learned ones only: a 'sincos' / 'none' encoding or a missing distillation token is no parameter
        return {n for n in ('patch_pos', 'pixel_pos', 'cls_token', 'dist_token')
                if isinstance(getattr(self, n), nn.Parameter)}

    def _prefix_tokens(self, batch_size: int) -> torch.Tensor:
        cls_token = self.cls_token.expand(batch_size, -1, -1)
        if self.dist_token is None:
            return cls_token
        return torch.cat([cls_token, self.dist_token.expand(batch_size, -1, -1)], dim=1)

    def _token_grid(self) -> Tuple[int, int]:
        return self.pixel_embed.grid_size

    def _input_embed(self) -> PixelEmbed:
        return self.pixel_embed

    def _patch_sincos(self) -> torch.Tensor:
        """ The fixed 2D sin-cos encoding of the patch grid, zero on the prefix tokens (1, prefix + N, D). """
        sincos = build_sincos2d_pos_embed(list(self.pixel_embed.grid_size), self.embed_dim)
        return F.pad(sincos, (0, 0, self.num_prefix_tokens, 0))[None]

    def _resample_pos_embed(self, old_grid: Tuple[int, int]) -> None:
        if isinstance(self.patch_pos, nn.Parameter):
            self.patch_pos = nn.Parameter(resample_token_pos(
                self.patch_pos.detach(), old_grid, self.pixel_embed.grid_size, self.num_prefix_tokens))
        elif self.patch_pos is not None:  # sin-cos: rebuilt for the grid
            self.patch_pos = self._patch_sincos().to(self.patch_pos)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ Image -> (patch sequence (B, prefix + N, D), pixel tokens (B*N, h*w, C_in)). """
        B = x.shape[0]
        pixel_embed = self.pixel_embed(x)
        if self.pixel_pos is not None:
            pixel_embed = pixel_embed + self.pixel_pos
        pixel_embed = pixel_embed.flatten(2).transpose(1, 2).contiguous()
        pixels_per_patch = pixel_embed.reshape(B, self.num_patches, self.proj.in_features)  # explicit: B may be 0
        patch_embed = self.norm2_proj(self.proj(self.norm1_proj(pixels_per_patch)))
        patch_embed = torch.cat([self._prefix_tokens(B), patch_embed], dim=1)
        if self.patch_pos is not None:
            patch_embed = patch_embed + self.patch_pos
        return self.pos_drop(patch_embed), pixel_embed

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self._pool(x)
        return x if pre_logits else self.head(x)


class CNTDistilled(CNT):
    """ CNT with a DeiT distillation token and head (https://arxiv.org/abs/2012.12877).

    Follows timm's VisionTransformerDistilled contract, so timm's TokenDistillationTask trains it unchanged: after
    `set_distilled_training(True)` the model returns `(cls_logits, dist_logits)` in training mode, otherwise the mean
    of the two heads.
    """

    def __init__(self, *args, **kwargs):
        kwargs.pop('dist_token', None)
        super().__init__(*args, dist_token=True, **kwargs)
        self.head_dist = self._new_head(self.num_classes)
        self.head_dist.apply(_init_weights)
        self.distilled_training = False

    @torch.jit.ignore
    def get_classifier(self) -> Tuple[nn.Module, nn.Module]:
        return self.head, self.head_dist

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.head_dist = self._new_head(num_classes)

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x, x_dist = x[:, 0], x[:, 1]
        if pre_logits:
            return (x + x_dist) / 2
        x = self.head(self.head_drop(x))
        x_dist = self.head_dist(self.head_drop(x_dist))
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            # separate predictions only while training in distilled mode
            return x, x_dist
        return (x + x_dist) / 2


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --- checkpoint conversion -------------------------------------------------------------------------------------------

# timm TNT block keys -> CNT block keys (the inner / outer transformers are timm ViT blocks here)
_TNT_BLOCK_RENAMES = (
    ('.norm_in.', '.inner.norm1.'),
    ('.attn_in.', '.inner.attn.'),
    ('.norm_mlp_in.', '.inner.norm2.'),
    ('.mlp_in.', '.inner.mlp.'),
    ('.norm_out.', '.outer.norm1.'),
    ('.attn_out.', '.outer.attn.'),
    ('.norm_mlp.', '.outer.norm2.'),
    ('.mlp.', '.outer.mlp.'),
)
# timm / DeiT ViT block keys -> CNT outer block keys
_VIT_BLOCK_PARTS = ('norm1', 'attn', 'ls1', 'norm2', 'mlp', 'ls2')


def _fuse_qk_v(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """ TNT's attention has separate qk and v projections; timm's ViT attention one qkv = [q; k; v]. """
    out = {}
    for k, v in state_dict.items():
        if '.qk.' in k:
            out[k.replace('.qk.', '.qkv.')] = torch.cat([v, state_dict[k.replace('.qk.', '.v.')]], dim=0)
        elif '.v.' not in k:
            out[k] = v
    return out


def _from_tnt(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in _fuse_qk_v(state_dict).items():
        if k.startswith('blocks.'):
            for old, new in _TNT_BLOCK_RENAMES:
                if old in k:
                    k = k.replace(old, new)
                    break
        out[k] = v
    return out


def _from_vit(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        if k.startswith('blocks.') and k.split('.')[2] in _VIT_BLOCK_PARTS:
            i, rest = k.split('.', 2)[1:]
            k = f'blocks.{i}.outer.{rest}'
        elif k == 'pos_embed':
            k = 'patch_pos'
        out[k] = v
    return out


def _adapt_patch_pos(pos: torch.Tensor, model: CNT, state_dict: Dict[str, Any]) -> torch.Tensor:
    """ Matches prefix tokens (class / distillation) and resamples the patch grid, from the checkpoint's own grid
    (`source_token_grid`), to the model's. """
    num_prefix_src = 1 + int('dist_token' in state_dict)
    num_prefix = model.num_prefix_tokens
    source_grid = source_token_grid(state_dict, model, pos.shape[1] - num_prefix_src, model.pixel_embed.patch_size)
    if num_prefix_src != num_prefix:
        prefix = pos[:, :num_prefix_src]
        # a missing distillation token position starts from the class token's
        prefix = prefix[:, :num_prefix] if num_prefix_src > num_prefix else torch.cat([prefix, prefix[:, :1]], 1)
        pos = torch.cat([prefix, pos[:, num_prefix_src:]], dim=1)
    return resample_token_pos(pos, source_grid, model.pixel_embed.grid_size, num_prefix)


def _match_distillation(state_dict: Dict[str, torch.Tensor], model: CNT) -> Dict[str, torch.Tensor]:
    """ CNT <-> CNT-distilled: a missing distillation token and head start as copies of the class token and head, a
    distillation token and head the model lacks are dropped (both logged). """
    has_dist = model.dist_token is not None
    dist_keys = [k for k in state_dict if k == 'dist_token' or k.startswith('head_dist.')]
    if has_dist and 'dist_token' not in state_dict:
        state_dict['dist_token'] = state_dict['cls_token'].clone()
        state_dict.update({k.replace('head.', 'head_dist.', 1): v.clone() for k, v in list(state_dict.items())
                           if k.startswith('head.')})
        _logger.warning('CNT -> CNTDistilled: the distillation token and head start as copies of the class token '
                        'and head.')
    elif not has_dist and dist_keys:
        for k in dist_keys:
            del state_dict[k]
        _logger.warning('CNTDistilled -> CNT: the distillation token and head are dropped.')
    return state_dict


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: CNT) -> Dict[str, torch.Tensor]:
    """ Converts a CNT, timm TNT or timm DeiT / ViT state dict for `model`.

    CNT checkpoints pass through (patch position embedding resampled from the checkpoint's grid to the model's; a
    distillation token and head added or dropped to match), and a strict load then names any key that does not fit.
    TNT / DeiT checkpoints are for fine-tuning: every tensor that fits is taken (outer blocks, embeddings, head; TNT's
    inner transformer when inner_block='attn'), the rest of the model keeps its fresh initialisation, and what was
    skipped is logged with the reason. A ValueError names the layout seen when it is none of these, or when less than
    MIN_LOADED_SHARE (half) of the model's weights would come from the checkpoint.
    """
    state_dict = unwrap_checkpoint(state_dict)
    layout = describe_layout(state_dict)
    if layout == 'timm TNT':
        state_dict = _from_tnt(state_dict)
    elif layout == 'timm ViT / DeiT':
        state_dict = _from_vit(state_dict)
    elif layout != 'CNT':
        raise ValueError(
            f'checkpoint_filter_fn: not a CNT, timm TNT or timm DeiT/ViT state dict for {type(model).__name__}, but '
            f'a {layout} one.')

    if 'patch_pos' in state_dict and isinstance(model.patch_pos, torch.Tensor):
        state_dict['patch_pos'] = _adapt_patch_pos(state_dict['patch_pos'], model, state_dict)
    state_dict['token_grid'] = model.token_grid  # what the position embedding is now resampled to
    if layout == 'CNT':
        return _match_distillation(state_dict, model)

    model_state = model.state_dict()
    out, skipped = {}, []
    for k, v in state_dict.items():
        if k not in model_state:
            skipped.append(f'{k}: no such tensor in this model')
        elif model_state[k].shape != v.shape:
            skipped.append(f'{k}: shape {tuple(v.shape)} != model {tuple(model_state[k].shape)}')
        else:
            out[k] = v
    check_loaded_share(out, model, layout, skipped)
    kept_init = [k for k in model_state if k not in out]
    if skipped:
        _logger.warning(
            f'{layout} -> {type(model).__name__} ({type(model.blocks[0].inner).__name__} inner block): skipped '
            f'{len(skipped)} tensors:\n  ' + '\n  '.join(summarize_keys(skipped)))
    if kept_init:
        _logger.warning(
            f'{layout} -> {type(model).__name__}: {len(kept_init)} tensors keep their fresh initialisation:\n  '
            + '\n  '.join(summarize_keys(kept_init)))
    # fill what the source lacks from the model itself, so the (strict) load sees a complete state dict
    out.update({k: model_state[k] for k in kept_init})
    return out


# --- pretrained configs and entry points -----------------------------------------------------------------------------

def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    # TNT's evaluation settings and its paper: CNT is TNT with convolutional inner blocks
    return token_model_cfg(url, **{
        'first_conv': 'pixel_embed.proj', 'classifier': 'head',
        'paper_ids': 'arXiv:2103.00112', 'paper_name': 'Transformer in Transformer', 'license': 'apache-2.0',
        **kwargs})


# the 28 px Fashion-MNIST tags (nano_cfg: their input size, mean / std and labels)
_FMNIST_CFG = dict(
    first_conv='pixel_embed.proj', classifier='head',
    paper_ids='arXiv:2103.00112', paper_name='Transformer in Transformer')
_FMNIST_DISTILLED_CFG = dict(
    _FMNIST_CFG, classifier=('head', 'head_dist'), paper_ids=('arXiv:2103.00112', 'arXiv:2012.12877'))

default_cfgs = generate_default_cfgs({
    'cnt_ti_patch16_224': _cfg(),
    'cnt_s_patch16_224': _cfg(),
    'cnt_b_patch16_224': _cfg(),
    'cnt_ti_distilled_patch16_224': _cfg(classifier=('head', 'head_dist')),
    'cnt_s_distilled_patch16_224': _cfg(classifier=('head', 'head_dist')),
    'cnt_b_distilled_patch16_224': _cfg(classifier=('head', 'head_dist')),
    # 28 px Fashion-MNIST weights, in the wheel (the 224 sizes have no weights, so no source)
    'cnt_nano_patch7_28.fmnist': nano_cfg(**packaged_weights('cnt_nano_patch7_28'), **_FMNIST_CFG),
    'cnt_nano_distilled_patch7_28.fmnist': nano_cfg(
        **packaged_weights('cnt_nano_distilled_patch7_28'), **_FMNIST_DISTILLED_CFG),
    # micro: the folders `benchmarks/fmnist_micro_study.py publish` has written (no source until then)
    'cnt_micro_patch4_28.fmnist': nano_cfg(**packaged_weights('cnt_micro_patch4_28'), **_FMNIST_CFG),
    'cnt_micro_distilled_patch4_28.fmnist': nano_cfg(
        **packaged_weights('cnt_micro_distilled_patch4_28'), **_FMNIST_DISTILLED_CFG),
})


# Every size keeps its pixel path's activations for backward (`recompute_pixels=False`, the class default): for
# CNT-Ti recomputing them cost about 5% of a CPU training step (0.80x vs 0.85x DeiT-Ti). CNT-S / CNT-B recompute
# their outer MLPs' GELU on CPU instead (`recompute_mlp_act='cpu'`, the class default), which keeps CNT-S within
# 1.05x DeiT-S's training memory; CNT-Ti keeps those too: 0.850x DeiT-Ti's training step kept, 0.824x recomputed
# (README, "Speed"), and the issue bounds CNT-S's memory, not CNT-Ti's
_CNT_TI = dict(patch_size=16, embed_dim=192, inner_dim=8, depth=12, num_heads=3, recompute_mlp_act=False)
_CNT_S = dict(patch_size=16, embed_dim=384, inner_dim=16, depth=12, num_heads=6)
_CNT_B = dict(patch_size=16, embed_dim=640, inner_dim=32, depth=12, num_heads=10)
# 28x28 grayscale: 16 patches of 7x7 px, a 4x4 pixel grid each (stride-2 pixel embedding); cf. tnt_nano_patch7_28
_CNT_NANO = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, inner_dim=8, depth=6,
                 num_heads=2, first_stride=2)
# 28x28 grayscale with the 224 px models' token structure: 49 patches of 4x4 px, a stride-1 pixel embedding, so each
# patch's 4x4 pixel grid is made from its own 16 pixels. Widths of tnt_micro_patch4_28 (64 outer, 4 inner, depth 4):
# at 4 channels the 3x3 basic block costs about what TNT's inner attention + MLP on 16 pixels do, so the two match in
# fvcore GMACs (0.01352 vs 0.01370) and params (0.227 M vs 0.226 M); sizes and speeds in baselines.py. Its MLPs keep
# their GELU output for backward (as CNT-Ti's): at batch 128 a block's hidden tensor is 6.6 MB, no memory worth a
# second GELU pass (training step 0.812x -> 0.844x DeiT-micro's, 15 interleaved rounds, 1 thread).
_CNT_MICRO = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, inner_dim=4, depth=4,
                  num_heads=2, first_stride=1, recompute_mlp_act=False)

# Each registered variant's constructor arguments (as timm's levit.py keeps its `model_cfgs`); `distilled` picks
# CNTDistilled. A model function's kwargs override them.
_MODEL_ARGS = {
    'cnt_ti_patch16_224': _CNT_TI,
    'cnt_s_patch16_224': _CNT_S,
    'cnt_b_patch16_224': _CNT_B,
    'cnt_ti_distilled_patch16_224': dict(_CNT_TI, distilled=True),
    'cnt_s_distilled_patch16_224': dict(_CNT_S, distilled=True),
    'cnt_b_distilled_patch16_224': dict(_CNT_B, distilled=True),
    'cnt_nano_patch7_28': _CNT_NANO,
    'cnt_nano_distilled_patch7_28': dict(_CNT_NANO, distilled=True),
    'cnt_micro_patch4_28': _CNT_MICRO,
    'cnt_micro_distilled_patch4_28': dict(_CNT_MICRO, distilled=True),
}


# model-function kwargs -> create_inner_block options (the flat names are what train.py's --model-kwargs pass)
_INNER_BLOCK_OPTIONS = {
    'inner_impl': 'impl', 'conv_act_layer': 'conv_act_layer', 'conv_norm_layer': 'conv_norm_layer',
    'inner_num_heads': 'num_heads', 'inner_mlp_ratio': 'mlp_ratio',
}


def _create_cnt(variant: str, pretrained: bool = False, **kwargs) -> CNT:
    kwargs = dict(_MODEL_ARGS[variant], **kwargs)
    distilled = kwargs.pop('distilled', False)
    inner_block_args = {
        option: kwargs.pop(name) for name, option in _INNER_BLOCK_OPTIONS.items() if name in kwargs}
    if inner_block_args:
        kwargs['inner_block_args'] = dict(kwargs.get('inner_block_args') or {}, **inner_block_args)
    return build_token_model(
        CNTDistilled if distilled else CNT, variant, pretrained, checkpoint_filter_fn, default_depth=12, **kwargs)


@register_model
def cnt_ti_patch16_224(pretrained: bool = False, **kwargs) -> CNT:
    """ CNT-Ti: TNT-Ti's outer transformer (192 wide, 3 heads), ResNet basic blocks on 8-channel pixel grids. """
    return _create_cnt('cnt_ti_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def cnt_s_patch16_224(pretrained: bool = False, **kwargs) -> CNT:
    """ CNT-S: TNT-S's outer transformer (384 wide, 6 heads), ResNet basic blocks on 16-channel pixel grids. """
    return _create_cnt('cnt_s_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def cnt_b_patch16_224(pretrained: bool = False, **kwargs) -> CNT:
    """ CNT-B: TNT-B's outer transformer (640 wide, 10 heads), ResNet basic blocks on 32-channel pixel grids. """
    return _create_cnt('cnt_b_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def cnt_ti_distilled_patch16_224(pretrained: bool = False, **kwargs) -> CNTDistilled:
    """ CNT-Ti with a DeiT distillation token. """
    return _create_cnt('cnt_ti_distilled_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def cnt_s_distilled_patch16_224(pretrained: bool = False, **kwargs) -> CNTDistilled:
    """ CNT-S with a DeiT distillation token. """
    return _create_cnt('cnt_s_distilled_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def cnt_b_distilled_patch16_224(pretrained: bool = False, **kwargs) -> CNTDistilled:
    """ CNT-B with a DeiT distillation token. """
    return _create_cnt('cnt_b_distilled_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def cnt_nano_patch7_28(pretrained: bool = False, **kwargs) -> CNT:
    """ CNT for 28x28 grayscale (Fashion-MNIST), matched in GMACs to tnt_nano_patch7_28 and deit_nano_patch7_28. """
    return _create_cnt('cnt_nano_patch7_28', pretrained=pretrained, **kwargs)


@register_model
def cnt_nano_distilled_patch7_28(pretrained: bool = False, **kwargs) -> CNTDistilled:
    """ cnt_nano_patch7_28 with a DeiT distillation token. """
    return _create_cnt('cnt_nano_distilled_patch7_28', pretrained=pretrained, **kwargs)


@register_model
def cnt_micro_patch4_28(pretrained: bool = False, **kwargs) -> CNT:
    """ CNT for 28x28 grayscale: 49 patches with a 4x4 pixel grid each, matched to tnt / deit_micro_patch4_28. """
    return _create_cnt('cnt_micro_patch4_28', pretrained=pretrained, **kwargs)


@register_model
def cnt_micro_distilled_patch4_28(pretrained: bool = False, **kwargs) -> CNTDistilled:
    """ cnt_micro_patch4_28 with a DeiT distillation token. """
    return _create_cnt('cnt_micro_distilled_patch4_28', pretrained=pretrained, **kwargs)
