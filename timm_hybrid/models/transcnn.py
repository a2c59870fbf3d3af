""" TransCNN and HAT-Net: hierarchical multi-head self-attention (H-MHSA) in a convolutional pyramid

'Transformer in Convolutional Neural Networks' (TransCNN, arXiv:2106.03180 v1/v2) and its revision 'Vision Transformers
with Hierarchical Attention' (HAT-Net, same arXiv id, v3+; Machine Intelligence Research 2024). Official code:
https://github.com/yun-liu/TransCNN (tag v1.0: TransCNN; HEAD: HAT-Net), also served as yun-liu/HAT-Net.

    image (B, 3, H, W)
      -> stem: 3x3/2 conv (16 ch) + norm + act, 3x3/2 conv                       (B, C1, H/4, W/4)
      4 stages (stage i > 0 starts with a stride-2 downsample), each a stack of:
          x += H-MHSA(x)     window attention in GxG cells, then full-resolution queries over the map
                             average-pooled by the stage's ratio (8, 4, 2); the last stage is plain global MHSA
          x += FFN(x)        inverted residual: 1x1 expand, depthwise kxk, 1x1 project
      -> global average pool -> dropout -> linear

The attention cost at stage 1 is what the hierarchy buys: a 64x64 map (TransCNN at 256 px) attends over 4096 tokens
per query with plain MHSA, over 64 (8x8 window) + 64 (pooled) tokens with H-MHSA.

TransCNN (BatchNorm, post-norm FFN, downsample with a max-pool -> 1x1 conv shortcut, 256 px) and HAT-Net
(GroupNorm(1, C) with eps 1e-6, pre-norm FFN, plain conv downsample, 224 px, window 7 in stages 2-3) are one class whose
constructor switches select either. `checkpoint_filter_fn` converts the official checkpoints of both.

Unlike the official code (multiples of 128 px for TransCNN, 224 px for HAT-Net), any input size works: a map that is
not a whole number of windows is zero-padded to one and the padded keys are masked out of the window attention, the
key/value pooling and the downsample's max-pool use ceil mode (partial cells average / max over their valid pixels).
At the official sizes nothing is padded and the outputs are the official ones. One limit in training mode: TransCNN's
BatchNorms need more than one value per channel, and the last stage's map (as the first stage's pooled keys) is
ceil(H / 32) x ceil(W / 32), so a training batch needs batch * ceil(H / 32) * ceil(W / 32) > 1 (batch 1 needs an
input side above 32 px); torch's BatchNorm raises "Expected more than 1 value per channel when training" otherwise.
HAT-Net's GroupNorm has no such limit, and eval mode has none in either.

In eval, TransCNN's BatchNorms next to a conv (the FFN's three, those before the 1x1 qkv / kv convs, the downsampling
ones) fold into the conv at each forward; `timm.utils.reparameterize_model` folds them into the modules once. Same
outputs within fp32 rounding.
"""
import math
import re
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.jit import Final

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead, ConvNormAct, DropPath, _assert, calculate_drop_path_rates, create_act_layer, create_conv2d,
    GroupNorm1, GroupNorm1Act, get_act_layer, get_norm_layer, register_notrace_function, trunc_normal_, use_fused_attn,
)
from timm.layers.fast_norm import fast_group_norm
from timm.models import generate_default_cfgs, register_model
from timm.models._efficientnet_blocks import InvertedResidual
from timm.models._features import feature_take_indices
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from ._common import (
    act_for, build_with_official_weights, check_image_batch, check_int, check_ints, check_loaded_share, check_positive,
    check_rate, checkpoint_keeping_bn_stats, conv2d_with, conv_norm_acts_eval, conv_norm_eval, cpu_chunk_size,
    describe_layout, fold_conv_norm, norm_conv1x1_eval, norm_conv1x1_weights, norm_folds_into_conv1x1, prune_sequence,
    unwrap_checkpoint,
)

__all__ = ['LayoutKeepingGroupNorm1', 'LayoutKeepingGroupNorm1Act', 'TransCNN', 'checkpoint_filter_fn']


@torch.jit.unused
def moves_layout_in_group_norm(x: torch.Tensor) -> bool:
    """ Whether aten's group_norm would hand `x` back in another layout: a channels-last 4-D map on any device but
    the CPU (there it keeps the layout; elsewhere it copies the map to NCHW and returns NCHW). False while FX traces
    (a traced tensor's device cannot steer Python control flow). """
    if is_fx_symbolic_tracing():
        return False
    return (x.device.type != 'cpu' and x.ndim == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


@torch.jit.unused
def group_norm1_channels_last(
        x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """ GroupNorm with one group of a channels-last (B, C, H, W) map, returned channels-last.

    One group normalises over all of C, H, W, whose order does not matter: a layer norm over the (B, H, W, C) view of
    the map is the same norm, computed in the map's own memory in one kernel, the per-channel affine as its (H, W, C)
    weight and bias.
    """
    hwc = (x.shape[2], x.shape[3], x.shape[1])
    weight = None if weight is None else weight.expand(hwc)
    bias = None if bias is None else bias.expand(hwc)
    return F.layer_norm(x.permute(0, 2, 3, 1), hwc, weight, bias, eps).permute(0, 3, 1, 2)


def group_norm1(
        x: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        eps: float,
        fast_norm: bool = False,
) -> torch.Tensor:
    """ GroupNorm with one group, in the layout the map came in (`group_norm1_channels_last` where aten would change
    it, aten's group_norm elsewhere and in TorchScript); `fast_norm`: timm's `fast_group_norm`, as timm's layers. """
    if fast_norm:
        return fast_group_norm(x, 1, weight, bias, eps)
    if torch.jit.is_scripting() or not moves_layout_in_group_norm(x):
        return F.group_norm(x, 1, weight, bias, eps)
    return group_norm1_channels_last(x, weight, bias, eps)


class LayoutKeepingGroupNorm1(GroupNorm1):
    """ timm's GroupNorm1, HAT-Net's norm, returning a channels-last map channels-last on every device.

    aten's group_norm keeps a channels-last map's layout on CPU only; on a GPU it copies the map to NCHW and returns
    NCHW. HAT-Net has five such norms a block, so on a GPU its maps ran NCHW after the first, and each FFN's depthwise
    conv ran PyTorch's own NCHW depthwise kernels instead of cuDNN's (which a depthwise conv gets for channels-last
    maps, for NCHW ones in fp16 only). Here such a map goes through `group_norm1_channels_last`; CPU, TorchScript and
    FX run aten's group_norm as timm does, and with timm's fast norm switched on (`timm.layers.set_fast_norm`) the
    layer is timm's. The parameters are timm's (weight, bias): checkpoints do not change.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm1(x, self.weight, self.bias, self.eps, self._fast_norm)


class LayoutKeepingGroupNorm1Act(GroupNorm1Act):
    """ timm's GroupNorm1Act (the norm + act of HAT-Net's stem and downsampling convs, in ConvNormAct) keeping a
    channels-last map channels-last on every device, as LayoutKeepingGroupNorm1. """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(group_norm1(x, self.weight, self.bias, self.eps, self._fast_norm))
        if torch.jit.is_scripting():
            return self.act(x)
        return act_for(x, self.act)(x)  # in place unless that keeps a copy for backward


def layout_keeping_group_norm1_act(num_channels: int, **kwargs) -> LayoutKeepingGroupNorm1Act:
    """ LayoutKeepingGroupNorm1Act as ConvNormAct's `norm_layer`: timm's `get_norm_act_layer` takes a function as
    the norm + act layer itself (a class it would look up among its own). Bind `act_layer` (it is not passed on). """
    return LayoutKeepingGroupNorm1Act(num_channels, **kwargs)


def scaled_dot_product(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: Optional[torch.Tensor],
        fused_attn: bool,
) -> torch.Tensor:
    """ softmax(q k^T / sqrt(d) + mask) v over the last two dims, fused (SDPA) or explicit. """
    if fused_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        attn = attn + attn_mask
    return attn.softmax(dim=-1) @ v


def window_key_mask(
        height: int,
        width: int,
        window_size: int,
        dtype: torch.dtype,
        device: torch.device,
) -> torch.Tensor:
    """ Additive mask (1, windows, 1, window_size**2) that hides the padding of a map padded to whole windows. """
    pad_h, pad_w = (-height) % window_size, (-width) % window_size
    mask = torch.zeros(height + pad_h, width + pad_w, dtype=dtype, device=device)
    mask[height:, :] = float('-inf')
    mask[:, width:] = float('-inf')
    grid_h, grid_w = (height + pad_h) // window_size, (width + pad_w) // window_size
    mask = mask.reshape(grid_h, window_size, grid_w, window_size).permute(0, 2, 1, 3)
    return mask.reshape(1, grid_h * grid_w, 1, window_size * window_size)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """ NCHW map -> (B, H, W, C): a free view of a channels-last map (a copy of a contiguous NCHW one).

    The explicit memory format (a no-op on channels-last maps) keeps traced graphs right where an op's meta strides
    differ from its CPU kernel's (GroupNorm): AOT autograd would otherwise record the reshape after it as a view.
    """
    return x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def to_map(x: torch.Tensor) -> torch.Tensor:
    """ (B, H, W, C) -> NCHW map in channels-last memory, a free view. """
    return x.permute(0, 3, 1, 2)


@register_notrace_function  # pads to whole windows only when needed: control flow on the map size
def window_attention(qkv: torch.Tensor, num_heads: int, window_size: int, fused_attn: bool) -> torch.Tensor:
    """ MHSA inside each non-overlapping window_size^2 cell of a q|k|v map (B, 3C, H, W) -> (B, C, H, W).

    Works on the channels-last layout: a channels-last input is read without a copy, the windows are gathered by one
    copy into (B * heads, windows, ws * ws, head_dim) (head_dim contiguous, as fused attention wants it) and scattered
    back by one copy into a channels-last output. A map that does not split into whole windows is zero-padded at the
    bottom / right and the padded keys are masked; every window keeps at least one real key, so no row of the softmax
    is empty.
    """
    B, C3, H, W = qkv.shape
    C = C3 // 3
    head_dim = C // num_heads
    ws = window_size
    pad_h, pad_w = (-H) % ws, (-W) % ws
    qkv = to_tokens(qkv)  # (B, H, W, 3C)
    attn_mask: Optional[torch.Tensor] = None
    if pad_h > 0 or pad_w > 0:
        qkv = F.pad(qkv, (0, 0, 0, pad_w, 0, pad_h))
        attn_mask = window_key_mask(H, W, ws, qkv.dtype, qkv.device)
    grid_h, grid_w = (H + pad_h) // ws, (W + pad_w) // ws
    # channels are (q|k|v, head, head_dim): -> 3 x (B * heads, windows, ws * ws, head_dim)
    qkv = qkv.reshape(B, grid_h, ws, grid_w, ws, 3, num_heads, head_dim).permute(5, 0, 6, 1, 3, 2, 4, 7)
    q, k, v = qkv.reshape(3, B * num_heads, grid_h * grid_w, ws * ws, head_dim).unbind(0)
    x = scaled_dot_product(q, k, v, attn_mask, fused_attn)
    # (B, heads, grid_h, grid_w, ws, ws, head_dim) -> (B, grid_h, ws, grid_w, ws, heads, head_dim)
    x = x.reshape(B, num_heads, grid_h, grid_w, ws, ws, head_dim).permute(0, 2, 4, 3, 5, 1, 6)
    x = x.reshape(B, grid_h * ws, grid_w * ws, C)
    if pad_h > 0 or pad_w > 0:
        x = x[:, :H, :W]
    return to_map(x)


@register_notrace_function  # pads to whole cells only when needed: control flow on the map size
def avg_pool_partial(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """ Average pooling over ratio x ratio cells (B, C, H, W) -> (B, C, ceil(H / ratio), ceil(W / ratio)); a partial
    cell at the bottom / right border averages its valid pixels.

    That is avg_pool2d's ceil_mode, written out: inductor's backward of ceil_mode avg_pool2d divides a partial cell's
    gradient by ratio^2 instead of its pixel count (torch 2.14; forward right, gradients 4x too small in a 2x2 corner
    cell), so compiled training at sizes that are not whole cells went wrong.
    """
    H, W = x.shape[-2], x.shape[-1]
    pad_h, pad_w = (-H) % ratio, (-W) % ratio
    if ratio == 1 or (pad_h == 0 and pad_w == 0):
        return F.avg_pool2d(x, ratio) if ratio > 1 else x
    pooled = F.avg_pool2d(F.pad(x, (0, pad_w, 0, pad_h)), ratio)  # sums over the valid pixels / ratio^2
    rows = torch.full((pooled.shape[-2], 1), float(ratio), dtype=x.dtype, device=x.device)
    rows[-1] = ratio - pad_h
    cols = torch.full((pooled.shape[-1],), float(ratio), dtype=x.dtype, device=x.device)
    cols[-1] = ratio - pad_w
    return pooled * (ratio * ratio / (rows * cols))


def token_attention(q: torch.Tensor, kv: torch.Tensor, num_heads: int, fused_attn: bool) -> torch.Tensor:
    """ Every position of q (B, C, H, W) attends over every position of kv (B, 2C, h, w) -> (B, C, H, W).

    Heads are split on the (B, H * W, C) token view, so on channels-last maps q, k, v are views with head_dim
    contiguous (fused attention's fast path) and the only copy is the one that merges the heads of the output.
    """
    B, C, H, W = q.shape
    head_dim = C // num_heads
    num_kv = kv.shape[-2] * kv.shape[-1]  # not -1 in the reshape: ambiguous for an empty batch (B = 0)
    q = to_tokens(q).reshape(B, H * W, num_heads, head_dim).transpose(1, 2)
    k, v = to_tokens(kv).reshape(B, num_kv, 2, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    x = scaled_dot_product(q, k, v, None, fused_attn)  # (B, heads, H*W, head_dim)
    return to_map(x.transpose(1, 2).reshape(B, H, W, C))


class HierarchicalAttention(nn.Module):
    """ H-MHSA on an NCHW map (1x1 convs as the projections, the norms are the network's BatchNorm / GroupNorm).

    With window_size > 1 (stages 1-3):
        local  = norm(x + window MHSA(qkv(norm(x))))                 attention inside window_size^2 cells
        global = MHSA(q(local), kv(norm(avg_pool(local, pool_ratio))))   every position over the pooled map
        out    = proj(global + local)
    The window q, k, v come from `qkv`, the global ones from separate `q` / `kv` convs, as in the paper's code.
    With window_size == 1 (stage 4): out = proj(MHSA(qkv(norm(x)))) over all positions.
    """
    fused_attn: Final[bool]

    def __init__(
            self,
            dim: int,
            head_dim: int = 64,
            window_size: int = 8,
            pool_ratio: int = 8,
            norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,  # the network's (HAT-Net: GroupNorm(1))
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % head_dim:
            raise ValueError(f'dim {dim} must be a multiple of head_dim {head_dim}.')
        self.num_heads = dim // head_dim
        self.window_size = window_size
        self.fused_attn = use_fused_attn()

        self.norm = norm_layer(dim, **dd)
        self.qkv = nn.Conv2d(dim, dim * 3, 1, **dd)
        if window_size > 1:
            self.local_norm = norm_layer(dim, **dd)
            self.pool_ratio = pool_ratio
            self.pool_norm = norm_layer(dim, **dd)
            self.q = nn.Conv2d(dim, dim, 1, **dd)
            self.kv = nn.Conv2d(dim, dim * 2, 1, **dd)
        else:
            self.pool_ratio = 1
            self.local_norm = self.pool_norm = self.q = self.kv = None
        self.proj = nn.Conv2d(dim, dim, 1, **dd)

    @torch.jit.ignore
    def reparameterize(self) -> None:
        """ Folds the inference BatchNorms before the 1x1 qkv / kv convs into them (the norms become Identity): what
        timm's `reparameterize_model` calls. Eval outputs are unchanged; those norms cannot train after. A norm with
        an act after its affine (timm's BatchNormAct2d as norm_layer) stays as it is. """
        for norm_name, conv_name in (('norm', 'qkv'), ('pool_norm', 'kv')):
            norm, conv = getattr(self, norm_name), getattr(self, conv_name)
            if conv is not None and norm_folds_into_conv1x1(norm, conv):
                setattr(self, conv_name, conv2d_with(conv, *norm_conv1x1_weights(norm, conv)))
                setattr(self, norm_name, nn.Identity())

    @torch.jit.unused
    def _qkv_folded(self, x: torch.Tensor) -> torch.Tensor:
        return norm_conv1x1_eval(x, self.norm, self.qkv)

    @torch.jit.unused
    def _kv_folded(self, pooled: torch.Tensor) -> torch.Tensor:
        return norm_conv1x1_eval(pooled, self.pool_norm, self.kv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[1]
        # in eager / traced inference the norms before the 1x1 qkv / kv convs fold into them (norm_conv1x1_eval)
        qkv = self.qkv(self.norm(x)) if torch.jit.is_scripting() else self._qkv_folded(x)
        if self.q is None:
            q, kv = qkv.split([C, 2 * C], dim=1)
            return self.proj(token_attention(q, kv, self.num_heads, self.fused_attn))

        local = self.local_norm(x + window_attention(qkv, self.num_heads, self.window_size, self.fused_attn))
        pooled = avg_pool_partial(local, self.pool_ratio)
        kv = self.kv(self.pool_norm(pooled)) if torch.jit.is_scripting() else self._kv_folded(pooled)
        return self.proj(token_attention(self.q(local), kv, self.num_heads, self.fused_attn) + local)


class FoldingInvertedResidual(InvertedResidual):
    """ TransCNN's FFN: timm's MobileNetV2 `InvertedResidual` (same modules and state dict) whose inference folds each
    inference-mode BatchNorm into the conv before it (conv_norm_eval): one pass over each expanded map instead of
    two. In stage 1 of transcnn_small the two norms on the (256, 64, 64) expanded maps were 8% of a CPU inference
    (batch 32, 2 threads). Training, TorchScript and other norms run timm's forward. """

    @torch.jit.ignore
    def reparameterize(self) -> None:
        """ Folds each BatchNorm into the conv before it (the norm leaves its act behind): what timm's
        `reparameterize_model` calls. Eval outputs are unchanged; the norms cannot train after. """
        for conv_name, norm_name in (('conv_pw', 'bn1'), ('conv_dw', 'bn2'), ('conv_pwl', 'bn3')):
            conv, norm = fold_conv_norm(getattr(self, conv_name), getattr(self, norm_name))
            setattr(self, conv_name, conv)
            setattr(self, norm_name, norm)

    @torch.jit.unused
    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = conv_norm_eval(x, self.conv_pw, self.bn1)
        x = conv_norm_eval(x, self.conv_dw, self.bn2)
        x = conv_norm_eval(self.se(self.aa(x)), self.conv_pwl, self.bn3)
        return self.drop_path(x) + shortcut if self.has_skip else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not self.training and self.conv_s2d is None:
            return self._forward_folded(x)
        # InvertedResidual's forward, written out: TorchScript does not compile super() calls
        shortcut = x
        if self.conv_s2d is not None:
            x = self.bn_s2d(self.conv_s2d(x))
        x = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        x = self.bn3(self.conv_pwl(self.se(self.aa(x))))
        return self.drop_path(x) + shortcut if self.has_skip else x


class PreNormInvertedResidual(nn.Module):
    """ HAT-Net's FFN: 1x1 expand -> act -> depthwise kxk -> act -> 1x1 project, with one norm before and one after.

    TransCNN's FFN (a norm after every conv) is timm's MobileNetV2 `InvertedResidual`; HAT-Net moved the norms out.
    Built as that one is (in / out channels, `dw_kernel_size`, `exp_ratio`), so a Block takes either. The block's
    residual is outside, as in TransCNN.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            dw_kernel_size: int = 3,
            exp_ratio: float = 4.,
            act_layer: Type[nn.Module] = nn.SiLU,
            norm_layer: Callable[..., nn.Module] = nn.GroupNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        hidden_chs = int(in_chs * exp_ratio)
        self.norm = norm_layer(in_chs, **dd)
        self.conv_pw = nn.Conv2d(in_chs, hidden_chs, 1, bias=False, **dd)
        self.act1 = create_act_layer(act_layer, inplace=True)
        self.conv_dw = create_conv2d(hidden_chs, hidden_chs, dw_kernel_size, depthwise=True, **dd)
        self.act2 = create_act_layer(act_layer, inplace=True)
        self.conv_pwl = nn.Conv2d(hidden_chs, out_chs, 1, bias=False, **dd)
        self.norm_out = norm_layer(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_pw(self.norm(x))
        if torch.jit.is_scripting():
            x = self.act2(self.conv_dw(self.act1(x)))
        else:
            # in place unless that keeps a copy of the expanded map for backward (`act_for`)
            x = act_for(x, self.act1)(x)
            x = self.conv_dw(x)
            x = act_for(x, self.act2)(x)
        return self.norm_out(self.conv_pwl(x))


class Block(nn.Module):
    """ x + H-MHSA(x), then x + FFN(x) (each branch normalises its own input).

    `mlp_layer(dim, dim)` builds the FFN, as timm's ViT Block takes its `mlp_layer`: TransCNN's timm
    `InvertedResidual` or HAT-Net's `PreNormInvertedResidual`, bound to the stage's expansion and kernel.
    `attn_kwargs` (head_dim, window_size, pool_ratio) configure the HierarchicalAttention.
    """

    def __init__(
            self,
            dim: int,
            mlp_layer: Callable[..., nn.Module],
            drop_path: float = 0.,
            norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
            **attn_kwargs,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.attn = HierarchicalAttention(dim, norm_layer=norm_layer, **attn_kwargs, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.mlp = mlp_layer(dim, dim, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(x))
        x = x + self.drop_path2(self.mlp(x))
        return x


class Downsample(nn.Module):
    """ Stride-2 3x3 conv + norm. TransCNN adds a shortcut (2x2 max-pool -> 1x1 conv + norm) and an act on the sum. """

    def __init__(
            self,
            in_dim: int,
            out_dim: int,
            shortcut: bool,  # TransCNN's; HAT-Net downsamples without one
            act_layer: Type[nn.Module],
            norm_layer: Callable[..., nn.Module],
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        conv_kwargs = dict(bias=True, apply_act=False, norm_layer=norm_layer, **dd)
        self.conv = ConvNormAct(in_dim, out_dim, 3, stride=2, **conv_kwargs)
        if shortcut:
            # ceil_mode: ceil(H / 2) rows like the stride-2 conv at odd sizes (the same at even ones)
            self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.shortcut = ConvNormAct(in_dim, out_dim, 1, **conv_kwargs)
            self.act = create_act_layer(act_layer, inplace=True)
        else:
            self.pool = self.shortcut = self.act = None

    @torch.jit.ignore
    def reparameterize(self) -> None:
        """ Folds each ConvNormAct's BatchNorm into its conv (the norm leaves its act behind): what timm's
        `reparameterize_model` calls. Eval outputs are unchanged; the norms cannot train after. """
        for conv_norm in (self.conv, self.shortcut):
            if conv_norm is not None:
                conv_norm.conv, conv_norm.bn = fold_conv_norm(conv_norm.conv, conv_norm.bn)

    @torch.jit.unused
    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        # inference: each ConvNormAct's norm folded into its conv, as in the FFN
        y = conv_norm_acts_eval(x, self.conv)
        if self.shortcut is None:
            return y
        return self.act(y + conv_norm_acts_eval(self.pool(x), self.shortcut))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not self.training:
            return self._forward_folded(x)
        if self.shortcut is None:
            return self.conv(x)
        x = self.conv(x) + self.shortcut(self.pool(x))
        if torch.jit.is_scripting():
            return self.act(x)
        return act_for(x, self.act)(x)


class TransCNNStage(nn.Module):
    """ Optional Downsample to `dim`, then `depth` Blocks; `block_kwargs` (mlp_layer, head_dim, window_size,
    pool_ratio) go to every Block. """

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            downsample: bool = True,
            downsample_shortcut: bool = True,
            drop_path: Union[float, List[float]] = 0.,
            act_layer: Type[nn.Module] = nn.SiLU,
            norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
            conv_norm_layer: Optional[Callable[..., nn.Module]] = None,  # the downsampling ConvNormAct's; norm_layer
            device=None,
            dtype=None,
            **block_kwargs,
    ):
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = Downsample(
                in_dim, dim, shortcut=downsample_shortcut, act_layer=act_layer,
                norm_layer=conv_norm_layer or norm_layer, device=device, dtype=dtype)
        else:
            self.downsample = nn.Identity()
        drop_path = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.Sequential(*[
            Block(dim, drop_path=drop_path[i], norm_layer=norm_layer, device=device, dtype=dtype, **block_kwargs)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint_keeping_bn_stats(block, x)
        else:
            x = self.blocks(x)
        return x


# A CPU training chunk holds TRAIN_CHUNK_SCALE times an eval chunk's images: forward + backward run every op of the
# model once a chunk, and in training that fixed cost outweighed the page faults of larger maps. HAT-Net-S's training
# step (batch 32, 2 threads, glibc's defaults, interleaved in one process with DeiT-S, 4 rounds): 0.453x DeiT-S whole,
# 0.521x / 0.556x / 0.568x / 0.586x / 0.479x in chunks of 3 (the eval rule) / 4 / 6 / 8 / 16 images (two runs); with
# this scale (7 images) 0.592x against 0.409x whole and 0.625x in chunks of 8 (a third run).
TRAIN_CHUNK_SCALE = 2


class TransCNN(nn.Module):
    """ TransCNN / HAT-Net.

    The two families differ in four switches (sizes are in the entry points):

    | family   | norm_layer (eps)    | mlp_pre_norm | downsample_shortcut | window_sizes | input |
    | TransCNN | batchnorm2d         | False        | True                | 8, 8, 8, 1   | 256   |
    | HAT-Net  | groupnorm1 (1e-6)   | True         | False               | 8, 7, 7, 1   | 224   |

    Keys / values are pooled by 8, 4, 2 in stages 1-3 of both, so every global attention sees an 8x8 (TransCNN at
    256 px) or 7x7 (HAT-Net at 224 px) map.

    Deviations from the official code, none of which changes a released model's outputs:
      * any input size runs (see the module docstring);
      * HAT-Net's attention has a GroupNorm `proj_norm` that its forward never uses: it is left out (2 * dim
        parameters per block: 5,760 in HAT-Net-Tiny, 9,216 / 16,512 / 23,552 in Small / Medium / Large; every
        parameter here gets a gradient) and `checkpoint_filter_fn` drops it;
      * the blocks' Dropout2d (rate 0 in every released model and training recipe) is left out;
      * the head dropout is timm's `drop_rate` (default 0 as in timm; the official classifier hard-codes 0.2).

    Inputs: a float (B, in_chans, H, W) batch, any H, W >= 1 (in training, TransCNN's BatchNorms need
    B * ceil(H / 32) * ceil(W / 32) > 1, see the module docstring). A wrong rank or channel count, or a zero height /
    width, raises an AssertionError naming what was expected; an empty batch (B = 0) gives (0, num_classes) logits in
    eval and training. NaN / inf are not checked (a full reduction and host sync per forward, and a data-dependent
    branch torch.export / ONNX cannot take): in eval they reach only their own sample's logits, in training
    TransCNN's BatchNorm statistics spread them over the batch (HAT-Net's GroupNorm does not).

    Reduced precision: CPU autocast keeps HAT-Net within 1.2e-2 (bf16) / 1.5e-3 (fp16) of fp32 (relative, logits and
    gradients). TransCNN's BatchNorm after every conv rescales each layer's rounding to unit size, so it grows stage
    by stage: logits 7e-2 / 9e-3, gradients 2.3e-1 / 8e-2 off fp32 (tiny configs at init, tests/test_reliability.py).
    Export: torch.jit.script, FX, torch.export (dynamic batch), torch.compile(fullgraph=True) and ONNX (dynamo
    exporter, run in onnxruntime) all match eager within 1e-4 (tests/test_reliability.py).
    """

    def __init__(
            self,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Tuple[int, ...] = (64, 128, 256, 512),
            depths: Tuple[int, ...] = (3, 4, 8, 3),
            head_dim: int = 64,
            mlp_ratios: Tuple[float, ...] = (4., 4., 6., 6.),
            kernel_sizes: Tuple[int, ...] = (5, 3, 5, 3),
            window_sizes: Tuple[int, ...] = (8, 8, 8, 1),
            pool_ratios: Tuple[int, ...] = (8, 4, 2, 1),
            stem_chs: int = 16,
            mlp_pre_norm: bool = False,
            downsample_shortcut: bool = True,
            norm_layer: Union[str, Callable[..., nn.Module]] = 'batchnorm2d',
            norm_eps: Optional[float] = None,
            act_layer: Union[str, Type[nn.Module]] = 'silu',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            channels_last: bool = True,
            cpu_chunk: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: Accepted for timm's API; the network is fully convolutional and runs at any size.
            in_chans: Number of image channels.
            num_classes: Number of classes of the head (0 for no head).
            global_pool: Head pooling type ('avg', as the paper; any timm SelectAdaptivePool2d type or '').
            embed_dims: Channels of the 4 stages.
            depths: Blocks per stage.
            head_dim: Channels per attention head.
            mlp_ratios: FFN expansion per stage.
            kernel_sizes: Depthwise kernel of the FFN per stage.
            window_sizes: Window of the local attention per stage; 1 = plain global MHSA.
            pool_ratios: Average-pooling ratio of the global keys / values per stage.
            stem_chs: Channels of the first stem conv.
            mlp_pre_norm: HAT-Net FFN (norm before and after) instead of TransCNN's (norm after each conv).
            downsample_shortcut: TransCNN's max-pool -> 1x1 conv shortcut in the downsampling layers.
            norm_layer: Norm of every layer ('batchnorm2d' for TransCNN, 'groupnorm1' for HAT-Net).
            norm_eps: Epsilon of the norm layers (None: the layer's default; HAT-Net uses 1e-6).
            act_layer: Activation (SiLU in both).
            drop_rate: Dropout before the classifier (the official models train with 0.2).
            drop_path_rate: Stochastic depth rate (linearly increasing over all blocks).
            channels_last: Run the maps in channels-last memory (the outputs are the same; False: the plain NCHW
                layout, kept as the reference the fast path is tested against).
            cpu_chunk: On CPU, in eval and in training where no norm takes batch statistics (HAT-Net's GroupNorms;
                not TransCNN's BatchNorms), run a batch this many images at a time (None: as many as keep one
                image's largest map, the first stage's FFN expansion, below 24 MiB: 6 for TransCNN-S at 256, 3 for
                HAT-Net-S; in training TRAIN_CHUNK_SCALE times as many, 7 for HAT-Net-S; 0: the batch whole).
                Same outputs and gradients (in training, drop path draws its masks chunk by chunk); see
                `cpu_chunk_size` in models/_common.py for the measured reason.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(embed_dims)
        if not all(len(a) == num_stages for a in (depths, mlp_ratios, kernel_sizes, window_sizes, pool_ratios)):
            raise ValueError('embed_dims, depths, mlp_ratios, kernel_sizes, window_sizes and pool_ratios need one '
                             'value per stage.')
        check_int('in_chans', in_chans, 1)
        check_int('num_classes', num_classes, 0)
        check_int('head_dim', head_dim, 1)
        check_int('stem_chs', stem_chs, 1)
        for i, dim in enumerate(check_ints('embed_dims', embed_dims, 1, length=num_stages)):
            if dim % head_dim:
                raise ValueError(f'embed_dims[{i}] ({dim}) must be a multiple of head_dim ({head_dim}).')
        check_ints('depths', depths, 1, length=num_stages)
        check_ints('window_sizes', window_sizes, 1, length=num_stages)
        check_ints('pool_ratios', pool_ratios, 1, length=num_stages)
        if any(k % 2 == 0 for k in check_ints('kernel_sizes', kernel_sizes, 1, length=num_stages)):
            raise ValueError(f'kernel_sizes must be odd (the FFN keeps the map size), got {tuple(kernel_sizes)}.')
        for ratio in mlp_ratios:
            check_positive('mlp_ratios', ratio)
        check_rate('drop_rate', drop_rate)
        check_rate('drop_path_rate', drop_path_rate)
        act_layer = get_act_layer(act_layer)
        # conv_norm_layer: what the stem's and downsampling's ConvNormAct make their norm + act from
        norm_layer = conv_norm_layer = get_norm_layer(norm_layer)
        if norm_layer is GroupNorm1:  # HAT-Net's: its maps stay channels-last on GPUs as well
            norm_layer = LayoutKeepingGroupNorm1
            conv_norm_layer = partial(layout_keeping_group_norm1_act, act_layer=act_layer)
        if norm_eps is not None:
            norm_layer, conv_norm_layer = partial(norm_layer, eps=norm_eps), partial(conv_norm_layer, eps=norm_eps)

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.channels_last = channels_last
        self.cpu_chunk = None if cpu_chunk is None else check_int('cpu_chunk', cpu_chunk, 0)
        # (channels of a stage's widest map, its stride): the FFN's expanded maps, for cpu_chunk
        self._widest_maps = [(int(d * max(r, 1)), 4 * 2 ** i) for i, (d, r) in enumerate(zip(embed_dims, mlp_ratios))]

        self.stem = nn.Sequential(
            ConvNormAct(
                in_chans, stem_chs, 3, stride=2, bias=True, norm_layer=conv_norm_layer, act_layer=act_layer, **dd),
            nn.Conv2d(stem_chs, embed_dims[0], 3, stride=2, padding=1, **dd),
        )

        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=False)
        ffn_layer = PreNormInvertedResidual if mlp_pre_norm else partial(FoldingInvertedResidual, noskip=True)
        stages = []
        self.feature_info = []
        in_dim, reduction, first_block = embed_dims[0], 4, 0
        for i in range(num_stages):
            reduction *= 1 if i == 0 else 2
            stages.append(TransCNNStage(
                in_dim,
                embed_dims[i],
                depths[i],
                downsample=i > 0,
                downsample_shortcut=downsample_shortcut,
                head_dim=head_dim,
                window_size=window_sizes[i],
                pool_ratio=pool_ratios[i],
                mlp_layer=partial(
                    ffn_layer, dw_kernel_size=kernel_sizes[i], exp_ratio=mlp_ratios[i], act_layer=act_layer,
                    norm_layer=norm_layer),
                drop_path=dpr[first_block:first_block + depths[i]],
                act_layer=act_layer,
                norm_layer=norm_layer,
                conv_norm_layer=conv_norm_layer,
                **dd,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f'stages.{i}'))
            in_dim, first_block = embed_dims[i], first_block + depths[i]
        self.stages = nn.Sequential(*stages)

        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # Norm scales and biases: what the official recipe (PVT's, timm's optimizer factory) leaves undecayed. The
        # model has no position embeddings or tokens.
        return {n for n, p in self.named_parameters() if p.ndim <= 1}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        # the stem's device / dtype: after reset_classifier(0) the head has no parameter to take them from
        stem_weight = self.stem[1].weight
        self.head.reset(num_classes, pool_type=global_pool, device=stem_weight.device, dtype=stem_weight.dtype)
        self.head.train(self.training)

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_batch(x, self.in_chans)
        # one assert per side: FX cannot take `and` of two traced conditions
        _assert(x.shape[2] > 0, f'Input height is 0; any height >= 1 works (width {x.shape[3]}).')
        _assert(x.shape[3] > 0, f'Input width is 0; any width >= 1 works (height {x.shape[2]}).')

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,  # timm's API; there is no final norm (the head pools first)
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """ Stage outputs (NCHW) selected by `indices` (last n if an int), as timm's hierarchical models; `norm` is
        accepted for the API but there is no final norm. """
        assert output_fmt == 'NCHW', 'Output format must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)

        self._check_input(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # as forward_features
        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice stages in torchscript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)

        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,  # timm's API; there is no final norm
            prune_head: bool = True,
    ) -> List[int]:
        """ Prune layers not required for specified intermediates. """
        return prune_sequence(self, 'stages', indices, prune_head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not torch.jit.is_scripting():
            chunk = self._cpu_chunk(x)
            if chunk:  # each image on its own: chunk-sized maps reuse malloc's heap
                return torch.cat([self._forward_features(part) for part in x.split(chunk)])
        return self._forward_features(x)

    @torch.jit.unused
    def _cpu_chunk(self, x: torch.Tensor) -> int:
        """ Images per chunk of a CPU forward (0: the batch whole): in eval, and in training where no norm takes batch
        statistics (HAT-Net's GroupNorms normalise each image alone, TransCNN's BatchNorms need the whole batch).
        HAT-Net-S's CPU training step (batch 32, 2 threads, glibc's defaults) ran 1.45x as fast in its 7-image
        chunks as whole, 61 thousand page faults a step instead of 0.89 million (scratch A/B, 4 rounds, DeiT-S in the
        same rounds; 1.01x with glibc keeping freed memory, 4-image chunks). A training chunk is TRAIN_CHUNK_SCALE
        times the eval one. """
        scale = TRAIN_CHUNK_SCALE if self.training else 1
        chunk = cpu_chunk_size(x, self.cpu_chunk, lambda: self._per_sample_activation_bytes(x) // scale)
        # the module scan only where a chunk would run: not on accelerators, nor under tracers and torch.compile
        return 0 if chunk and self.training and self._batch_statistics() else chunk

    @torch.jit.unused
    def _batch_statistics(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.modules())

    @torch.jit.unused
    def _per_sample_activation_bytes(self, x: torch.Tensor) -> int:
        H, W = x.shape[-2:]
        elems = max(c * math.ceil(H / s) * math.ceil(W / s) for c, s in self._widest_maps) if self._widest_maps else 0
        return elems * self.stem[1].weight.element_size()

    def _forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            # oneDNN's depthwise and 1x1 convs run 2-60x faster on channels-last maps than on NCHW ones (CPU, 2
            # threads), and the attention's q / k / v become views with head_dim contiguous: HAT-Net-S inference
            # went from 0.37x to ~0.5x DeiT-S, its leaf ops per inference from 526 to 261
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    # the official init: truncated normal (std .02) for every conv and linear weight, zero biases; norms keep
    # PyTorch's unit scale / zero shift
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# --- checkpoint conversion -------------------------------------------------------------------------------------------

# official block keys (after 'blocks.{stage}.{block}.') -> ours; the FFN is nn.Sequential's in the official code
_ATTN_RENAMES = (('attn.grid_norm.', 'attn.local_norm.'), ('attn.ds_norm.', 'attn.pool_norm.'))
_TRANSCNN_FFN = {
    'conv1.0': 'conv_pw', 'conv1.1': 'bn1', 'conv2.0': 'conv_dw', 'conv2.1': 'bn2', 'conv3.0': 'conv_pwl',
    'conv3.1': 'bn3',
}
_HATNET_FFN = {'conv1.0': 'norm', 'conv1.1': 'conv_pw', 'conv2.0': 'conv_dw', 'conv3.0': 'conv_pwl',
               'conv3.1': 'norm_out'}
_DOWNSAMPLE = {'conv': 'conv.conv', 'norm1': 'conv.bn', 'norm': 'conv.bn', 'residual': 'shortcut.conv',
               'norm2': 'shortcut.bn'}
_STEM = {'0': 'stem.0.conv', '1': 'stem.0.bn', '3': 'stem.1'}


def _rename_official(key: str, ffn: Dict[str, str]) -> Optional[str]:
    """ One official TransCNN / HAT-Net key -> ours (None: a tensor the model does not have). """
    m = re.match(r'blocks\.(\d+)\.(\d+)\.(.*)', key)
    if m:
        stage, block, rest = m.groups()
        if rest.startswith('attn.proj_norm.'):
            return None  # HAT-Net: defined, never used in forward
        for old, new in _ATTN_RENAMES:
            rest = rest.replace(old, new)
        ffn_layer = re.match(r'conv\.(conv\d\.\d)\.(.*)', rest)
        if ffn_layer:
            rest = f'mlp.{ffn[ffn_layer.group(1)]}.{ffn_layer.group(2)}'
        return f'stages.{stage}.blocks.{block}.{rest}'
    m = re.match(r'ds(\d)\.(\w+)\.(.*)', key)
    if m:
        n, layer, rest = m.groups()
        return f'stages.{int(n) - 1}.downsample.{_DOWNSAMPLE[layer]}.{rest}'
    m = re.match(r'patch_embed\.(\d)\.(.*)', key)
    if m:
        return f'{_STEM[m.group(1)]}.{m.group(2)}'
    return key.replace('classifier.1.', 'head.fc.')


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: TransCNN) -> Dict[str, torch.Tensor]:
    """ Converts an official TransCNN (v1.0) or HAT-Net checkpoint for `model`; our own state dicts pass through.

    Accepts the raw state dict or the training checkpoint ({'model': ...}, 'state_dict', 'module.' prefixes). The
    official layouts are the same tensors under other names (1x1 convs stay convs), except HAT-Net's unused
    `attn.proj_norm`, which is dropped. A ValueError names the layout seen when less than MIN_LOADED_SHARE (half) of
    the model's weights would load. The model has no position embedding, so nothing depends on the input size.
    """
    state_dict = unwrap_checkpoint(state_dict)
    layout = describe_layout(state_dict)
    if layout == 'official TransCNN / HAT-Net':
        ffn = _HATNET_FFN if any(k.startswith('ds2.norm.') for k in state_dict) else _TRANSCNN_FFN
        state_dict = {new_key: v for new_key, v in (
            (_rename_official(k, ffn), v) for k, v in state_dict.items()) if new_key is not None}
    model_state = model.state_dict()
    check_loaded_share(state_dict, model, layout, [
        k for k, v in state_dict.items() if k not in model_state or model_state[k].shape != v.shape])
    return state_dict


# --- pretrained configs and entry points -----------------------------------------------------------------------------

def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        # PVT's evaluation transform, which both papers follow: resize to 256/224 of the crop, bicubic
        'crop_pct': .875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0.conv', 'classifier': 'head.fc',
        'paper_ids': 'arXiv:2106.03180',
        # the official repository has no LICENSE file
        'license': 'unknown',
        **kwargs,
    }


def _transcnn_cfg(file: str) -> Dict[str, Any]:
    # the v1.0 release of yun-liu/TransCNN, which was renamed yun-liu/HAT-Net (GitHub keeps a renamed repository's
    # releases under its new name); its README also links Google Drive copies
    return _cfg(
        url=f'https://github.com/yun-liu/HAT-Net/releases/download/v1.0/{file}',
        input_size=(3, 256, 256), pool_size=(8, 8),
        paper_name='Transformer in Convolutional Neural Networks',
        origin_url='https://github.com/yun-liu/HAT-Net',
    )


def _hatnet_cfg(file: str) -> Dict[str, Any]:
    return _cfg(
        url=f'https://github.com/yun-liu/HAT-Net/releases/download/v2.0/{file}',
        paper_name='Vision Transformers with Hierarchical Attention',
        origin_url='https://github.com/yun-liu/HAT-Net',
    )


default_cfgs = generate_default_cfgs({
    'transcnn_tiny.in1k': _transcnn_cfg('TransCNN-Tiny.pth'),
    'transcnn_small.in1k': _transcnn_cfg('TransCNN-Small.pth'),
    'transcnn_medium.in1k': _transcnn_cfg('TransCNN-Medium.pth'),
    'transcnn_large.in1k': _transcnn_cfg('TransCNN-Large.pth'),
    'hatnet_tiny.in1k': _hatnet_cfg('HAT-Net_Tiny.pth'),
    'hatnet_small.in1k': _hatnet_cfg('HAT-Net_Small.pth'),
    'hatnet_medium.in1k': _hatnet_cfg('HAT-Net_Medium.pth'),
    'hatnet_large.in1k': _hatnet_cfg('HAT-Net_Large.pth'),
})


# what every TransCNN / every HAT-Net shares; each entry of _MODEL_ARGS adds its size
_TRANSCNN = dict(head_dim=64, kernel_sizes=(5, 3, 5, 3), window_sizes=(8, 8, 8, 1), pool_ratios=(8, 4, 2, 1))
_HATNET = dict(
    head_dim=64, kernel_sizes=(3, 3, 3, 3), mlp_ratios=(8, 8, 4, 4), window_sizes=(8, 7, 7, 1),
    pool_ratios=(8, 4, 2, 1), mlp_pre_norm=True, downsample_shortcut=False, norm_layer='groupnorm1', norm_eps=1e-6)


# Each registered variant's constructor arguments (as timm's levit.py keeps its `model_cfgs`); a model function's
# kwargs override them.
_MODEL_ARGS = {
    'transcnn_tiny': dict(_TRANSCNN, embed_dims=(64, 128, 256, 512), depths=(2, 2, 4, 2), mlp_ratios=(4, 4, 4, 4)),
    'transcnn_small': dict(_TRANSCNN, embed_dims=(64, 128, 256, 512), depths=(3, 4, 8, 3), mlp_ratios=(4, 4, 6, 6)),
    'transcnn_medium': dict(_TRANSCNN, embed_dims=(64, 128, 320, 640), depths=(3, 4, 12, 3), mlp_ratios=(4, 4, 6, 6)),
    'transcnn_large': dict(_TRANSCNN, embed_dims=(64, 128, 384, 768), depths=(3, 4, 16, 3), mlp_ratios=(4, 4, 6, 6)),
    'hatnet_tiny': dict(_HATNET, embed_dims=(48, 96, 240, 384), depths=(2, 2, 6, 3), head_dim=48),
    'hatnet_small': dict(_HATNET, embed_dims=(64, 128, 320, 512), depths=(2, 3, 8, 3)),
    'hatnet_medium': dict(_HATNET, embed_dims=(64, 128, 320, 512), depths=(3, 6, 18, 3), kernel_sizes=(5, 3, 5, 3)),
    'hatnet_large': dict(_HATNET, embed_dims=(64, 128, 320, 640), depths=(3, 8, 27, 3)),
}


def _create_transcnn(variant: str, pretrained: bool = False, **kwargs) -> TransCNN:
    kwargs = dict(_MODEL_ARGS[variant], **kwargs)
    return build_with_official_weights(
        TransCNN,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
        **kwargs,
    )


@register_model
def transcnn_tiny(pretrained: bool = False, **kwargs) -> TransCNN:
    """ TransCNN-Tiny, 256 px: 13.32M params. """
    return _create_transcnn('transcnn_tiny', pretrained=pretrained, **kwargs)


@register_model
def transcnn_small(pretrained: bool = False, **kwargs) -> TransCNN:
    """ TransCNN-Small, 256 px: 26.54M params. """
    return _create_transcnn('transcnn_small', pretrained=pretrained, **kwargs)


@register_model
def transcnn_medium(pretrained: bool = False, **kwargs) -> TransCNN:
    """ TransCNN-Medium, 256 px: 48.32M params. """
    return _create_transcnn('transcnn_medium', pretrained=pretrained, **kwargs)


@register_model
def transcnn_large(pretrained: bool = False, **kwargs) -> TransCNN:
    """ TransCNN-Large, 256 px: 80.03M params. """
    return _create_transcnn('transcnn_large', pretrained=pretrained, **kwargs)


@register_model
def hatnet_tiny(pretrained: bool = False, **kwargs) -> TransCNN:
    """ HAT-Net-Tiny, 224 px: 12.65M params (official 12.66M with the unused proj_norm). """
    return _create_transcnn('hatnet_tiny', pretrained=pretrained, **kwargs)


@register_model
def hatnet_small(pretrained: bool = False, **kwargs) -> TransCNN:
    """ HAT-Net-Small, 224 px: 25.74M params (official 25.75M with the unused proj_norm). """
    return _create_transcnn('hatnet_small', pretrained=pretrained, **kwargs)


@register_model
def hatnet_medium(pretrained: bool = False, **kwargs) -> TransCNN:
    """ HAT-Net-Medium, 224 px: 42.93M params (official 42.94M with the unused proj_norm). """
    return _create_transcnn('hatnet_medium', pretrained=pretrained, **kwargs)


@register_model
def hatnet_large(pretrained: bool = False, **kwargs) -> TransCNN:
    """ HAT-Net-Large, 224 px: 63.11M params (official 63.13M with the unused proj_norm). """
    return _create_transcnn('hatnet_large', pretrained=pretrained, **kwargs)
