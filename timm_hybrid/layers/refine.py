""" Refiner's attention-map refinement as a drop-in for the attention of timm's ViT / DeiT blocks.

Refiner (arXiv:2106.03714) treats a block's attention maps (B, H, N, N) as an H-channel image over the (query, key)
plane and convolves them (expand the heads, depthwise conv, reduce) before they weigh the values; the released code
also hands each block's map on to the next. `RefinedAttention` is timm's `Attention` with both:

    tokens (B, N, C) -> q, k, v (the host's qkv, q_norm, k_norm)
    map      = softmax(q k^T / sqrt(d) + mask)                    (B, H, N, N), timm's Attention exactly
    map     += hand_on * map handed on by the previous refined block   (per head; zero at insertion)
    refined  = map + reduce(dwconv(expand(map)))                  Refiner's AttentionRefiner; its last BN zero
    out      = proj(refined @ v)                                  (the host's proj, norm, gate)

With the zero-initialised last BatchNorm and hand-on gain, refined == softmax map exactly, so a refined model's
outputs equal the host's (up to fused vs explicit attention, ~1e-7). What differs from the released code: the released
plain blocks add 1/sqrt(d) times the received map (a fixed gain; `hand_on_init=head_dim ** -0.5` reproduces it but
leaves the identity), and its refiner blocks have no query / key of their own (they refine the previous block's map);
here every refined block keeps the host's q / k, because the host's pretrained weights are what it starts from.

The hand-on: timm's blocks are called `block(x)` one after another (nn.Sequential, checkpoint_seq, the
forward_intermediates loop), so the map cannot travel as an argument. The refined attentions of one model share an
`AttentionMapHandOn`: each takes the map its predecessor left there during the same forward pass and leaves its own.
Tracing (FX, torch.jit.trace, dynamo) follows that as ordinary data flow. With gradients on, every map of the pass
stays there until the next pass starts, which is what non-reentrant gradient checkpointing (timm's default) needs to
re-run a block with the map it first saw; reentrant checkpointing would cut the map's gradient, so it is refused.
"""
from typing import Dict, Optional, Sequence, Type, Union

import torch
import torch.nn as nn

from timm.layers import Attention, get_act_layer, get_norm_layer, use_reentrant_ckpt
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

from ..models.refiner import AttentionRefiner
from ._insert import graft, resolve_indices

__all__ = ['AttentionMapHandOn', 'AttentionRefiner', 'RefinedAttention', 'refine_attention']


class AttentionMapHandOn:
    """ The maps (B, H, N, N) that the refined attentions of one model hand on, by position in the chain. """

    def __init__(self):
        self.maps: Dict[int, torch.Tensor] = {}

    # the maps are one forward pass's scratch, not model state: a copy (EMA, torch.save) starts with none, also
    # right after a training step, when they are non-leaf tensors that deepcopy refuses
    def __deepcopy__(self, memo) -> 'AttentionMapHandOn':
        return AttentionMapHandOn()

    def __getstate__(self) -> dict:
        return {'maps': {}}

    def take(self, position: int) -> Optional[torch.Tensor]:
        """ The map the block before `position` left in this pass (None for the first). """
        if position == 0:
            return None
        attn = self.maps.get(position - 1)
        if attn is None:
            raise RuntimeError(
                f'Refined attention {position} of the chain runs before refined attention {position - 1} has handed '
                f'on its map in this forward pass: the blocks run in order (model.forward, forward_intermediates), not '
                f'one at a time.')
        return attn

    def give(self, position: int, attn: torch.Tensor, last: bool) -> None:
        if torch.is_grad_enabled():
            # a pass starts at the first block; its maps stay for backward's re-runs (gradient checkpointing)
            if position == 0:
                self.maps = {}
            self.maps[position] = attn
        else:
            self.maps = {} if last else {position: attn}  # inference keeps only what the next block reads


class RefinedAttention(Attention):
    """ timm's `Attention` whose softmax map is refined by Refiner's convolutions and receives the previous refined
    block's map. Tokens (B, N, C) -> (B, N, C); see the module docstring for the computation.

    Built like timm's Attention (`VisionTransformer(..., attn_layer=RefinedAttention)` refines every block, without
    hand-on), or from an existing one in place by `refine_attention`, which also chains the blocks (`join_chain`).
    The map is materialised (fused SDPA cannot refine it): memory and time grow with B * H * N^2, times
    `expand_ratio` inside the refiner.
    """
    inserted_names = ('refine', 'hand_on')

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: a clear message instead of a failure inside the first scripted forward
        raise RuntimeError('Refined attention (RefinedAttention) does not script: the map hand-on between blocks is a '
                           'Python object, which TorchScript cannot hold. Use torch.compile or FX instead.')

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            *,  # the refiner's options by name: timm's Block passes Attention's by name too
            refine_norm_layer: Union[str, Type[nn.Module]] = 'batchnorm2d',
            refine_act_layer: Union[str, Type[nn.Module]] = 'relu6',
            refine_expand_ratio: int = 3,
            refine_kernel_size: int = 3,
            device=None,
            dtype=None,
            **kwargs,
    ):
        """
        Args:
            dim, num_heads, **kwargs: timm's Attention (qkv_bias, qk_norm, proj_bias, attn_drop, norm_layer, ...).
            refine_expand_ratio: Maps per head inside the refiner (released: 3).
            refine_kernel_size: Depthwise kernel over the (query, key) plane (odd).
            refine_norm_layer, refine_act_layer: The refiner's norm (BatchNorm) and activation (ReLU6), as released.
        """
        super().__init__(dim, num_heads=num_heads, device=device, dtype=dtype, **kwargs)
        self._add_refiner(
            refine_expand_ratio=refine_expand_ratio, refine_kernel_size=refine_kernel_size,
            refine_norm_layer=refine_norm_layer, refine_act_layer=refine_act_layer)

    @classmethod
    def from_attention(cls, attn: Attention, **refine_kwargs) -> 'RefinedAttention':
        """ Refines `attn` (exactly a timm Attention) in place: its projections stay the same modules under the same
        keys, the refiner is added at its identity start. Keyword args: the refine_* of __init__. """
        refined = graft(attn, cls)
        refined._add_refiner(**refine_kwargs)
        return refined

    def _add_refiner(
            self,
            refine_expand_ratio: int = 3,
            refine_kernel_size: int = 3,
            refine_norm_layer: Union[str, Type[nn.Module]] = 'batchnorm2d',
            refine_act_layer: Union[str, Type[nn.Module]] = 'relu6',
    ) -> None:
        if refine_kernel_size % 2 == 0:
            raise ValueError(f'refine_kernel_size must be odd (the map keeps its size), got {refine_kernel_size}.')
        weight = self.qkv.weight
        dd = {'device': weight.device, 'dtype': weight.dtype}
        self.refine = AttentionRefiner(
            self.num_heads, expand_ratio=refine_expand_ratio, kernel_size=refine_kernel_size,
            norm_layer=get_norm_layer(refine_norm_layer), act_layer=get_act_layer(refine_act_layer),
            **dd).train(self.training)
        nn.init.zeros_(self.refine.reduce.bn.weight)  # refined = map + 0: the host's attention
        self.hand_on_chain: Optional[AttentionMapHandOn] = None
        self.chain_position = 0
        self.chain_last = True

    def join_chain(self, chain: AttentionMapHandOn, position: int, last: bool, hand_on_init: float = 0.) -> None:
        """ Takes part in `chain` at `position`: from the second position on, the received map is added with a
        per-head gain `hand_on` (shape (H, 1, 1)) that starts at `hand_on_init`. """
        self.hand_on_chain, self.chain_position, self.chain_last = chain, position, last
        if position > 0:
            weight = self.qkv.weight
            self.hand_on = nn.Parameter(torch.full(
                (self.num_heads, 1, 1), float(hand_on_init), device=weight.device, dtype=weight.dtype))

    @torch.jit.ignore  # the chain is a Python object, which TorchScript cannot hold: refined models do not script
    def _hand_on(self, attn: torch.Tensor) -> torch.Tensor:
        chain = self.hand_on_chain
        if chain is None:
            return attn
        received = chain.take(self.chain_position)
        if received is not None:
            attn = attn + self.hand_on * received  # (B, H, N, N)
        chain.give(self.chain_position, attn, self.chain_last)
        return attn

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal)).softmax(dim=-1)
        attn = self.attn_drop(self.refine(self._hand_on(attn)))
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim)  # (B, H, N, d) -> (B, N, H * d)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def refine_attention(
        model: nn.Module,
        blocks: Optional[Union[int, Sequence[int]]] = None,
        expand_ratio: int = 3,
        kernel_size: int = 3,
        hand_on: bool = True,
        hand_on_init: float = 0.,
        norm_layer: Union[str, Type[nn.Module]] = 'batchnorm2d',
        act_layer: Union[str, Type[nn.Module]] = 'relu6',
) -> nn.Module:
    """ Refines the attention of `model.blocks[i]` for i in `blocks`, in place; returns the model.

    Args:
        model: A timm transformer whose blocks hold timm's `Attention` as `.attn` (VisionTransformer: ViT, DeiT and
            their variants; any other model laid out so).
        blocks: Block indices (default all; negative from the end).
        expand_ratio, kernel_size, norm_layer, act_layer: The refiner (released: 3, 3, BatchNorm, ReLU6).
        hand_on: Chain the refined blocks: each receives the map of the refined block before it (the released
            Refiner's hand-on), scaled by a learned per-head gain.
        hand_on_init: The gain's start; 0 keeps the host's outputs at insertion.

    New state-dict keys: `blocks.{i}.attn.refine.*` and, from the second refined block on, `blocks.{i}.attn.hand_on`;
    the host's are unchanged.
    """
    host_blocks = getattr(model, 'blocks', None)
    if not isinstance(host_blocks, (nn.Sequential, nn.ModuleList)):
        raise TypeError(f'refine_attention needs a transformer with `blocks` (timm VisionTransformer and the like); '
                        f'{type(model).__name__} has none.')
    if hand_on and use_reentrant_ckpt():
        raise ValueError('refine_attention: the hand-on needs non-reentrant gradient checkpointing (timm\'s default); '
                         'TIMM_REENTRANT_CKPT / set_reentrant_ckpt(True) would cut the gradient of the handed-on maps. '
                         'Use hand_on=False with reentrant checkpointing.')
    indices = resolve_indices(blocks, len(host_blocks), 'block')
    wrong = [f'blocks.{i}.attn: {type(getattr(host_blocks[i], "attn", None)).__name__}' for i in indices
             if type(getattr(host_blocks[i], 'attn', None)) is not Attention]
    if wrong:
        raise TypeError(
            f'refine_attention refines timm.layers.Attention; {type(model).__name__} has ' + ', '.join(wrong))
    chain = AttentionMapHandOn() if hand_on else None
    for position, i in enumerate(indices):
        attn = RefinedAttention.from_attention(
            host_blocks[i].attn, refine_expand_ratio=expand_ratio, refine_kernel_size=kernel_size,
            refine_norm_layer=norm_layer, refine_act_layer=act_layer)
        if chain is not None:
            attn.join_chain(chain, position, last=position == len(indices) - 1, hand_on_init=hand_on_init)
    return model
