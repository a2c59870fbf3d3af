""" CNT's inner conv block in timm's TNT: "TNT with convolution inside the patches", starting from TNT's weights.

CNT (timm_hybrid/models/cnt.py) replaces TNT's inner transformer by a ResNet block on each patch's pixel grid. Into a
trained TNT the block goes in as a residual branch next to the inner transformer, in every block (or those chosen):

    pixel tokens (B*N, h*w, C)
      -> + ResNet block residual on the (B*N, C, h, w) grids     CNT's InnerResBlock, last BatchNorm zero: + 0
      -> TNT's inner transformer, pixel -> patch projection, outer transformer    (timm's tnt.Block, unchanged)

The identity argument: timm's BasicBlock / Bottleneck add the shortcut and then apply ReLU, and ReLU of TNT's signed
pixel embeddings is not the identity, so a zero last BatchNorm alone would not do. The inserted block has no
activation after the add (`x + bn2(conv2(relu(bn1(conv1(x)))))`, a residual branch), so with bn2's scale at zero the
pixel stream enters TNT's inner transformer unchanged and the host's logits are exactly its own. Its parameters are
those of InnerResBlock (timm's ResNet block), with all its computations ('conv', 'matmul', BatchNorm folding).
"""
from typing import Optional, Sequence, Type, Union

import torch
import torch.nn as nn

from timm.models.tnt import TNT, Block as TNTBlock

from ..models.cnt import InnerResBlock, create_inner_block
from ._insert import graft, resolve_indices

__all__ = ['ConvolvedTNTBlock', 'InnerResBlock', 'convolve_inner', 'inner_conv_block']


def inner_conv_block(
        dim: int,
        pixel_grid: Sequence[int],
        bottleneck: bool = False,
        impl: str = 'auto',
        act_layer: Optional[Union[str, Type[nn.Module]]] = None,
        norm_layer: Optional[Union[str, Type[nn.Module]]] = None,
        drop_path: float = 0.,
        device=None,
        dtype=None,
) -> InnerResBlock:
    """ CNT's inner ResNet block on pixel tokens (B*N, h*w, dim) -> same, as a residual branch: no activation after the
    shortcut add, the last BatchNorm's scale zero, so it starts as the identity. """
    block = create_inner_block(
        'bottleneck' if bottleneck else 'basic', impl=impl, conv_act_layer=act_layer, conv_norm_layer=norm_layer)(
        dim, tuple(pixel_grid), drop_path=drop_path, device=device, dtype=dtype)
    block.init_weights(zero_init_last=True)
    setattr(block.conv_block, block.out_act, nn.Identity())  # out_act: the activation after the shortcut add
    return block


class ConvolvedTNTBlock(TNTBlock):
    """ timm's TNT block with CNT's inner conv block first on the pixel stream:
    (pixel tokens (B*N, h*w, C), patch tokens (B, 1 + N, D)) -> the same shapes. Built from a TNT block in place by
    `convolve_inner`; the TNT block's own modules and keys are unchanged, `inner_conv.*` is new. """
    inserted_names = ('inner_conv',)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: a clear message instead of TorchScript's "no attribute 'forward'"
        raise RuntimeError('A TNT with CNT\'s inner conv block (ConvolvedTNTBlock) does not script: TorchScript cannot '
                           'call the timm TNT block it extends (super().forward). Use torch.compile or FX instead.')

    def forward(self, pixel_embed: torch.Tensor, patch_embed: torch.Tensor):
        return super().forward(self.inner_conv(pixel_embed), patch_embed)


def convolve_inner(
        model: TNT,
        blocks: Optional[Union[int, Sequence[int]]] = None,
        bottleneck: bool = False,
        impl: str = 'auto',
        act_layer: Optional[Union[str, Type[nn.Module]]] = None,
        norm_layer: Optional[Union[str, Type[nn.Module]]] = None,
) -> TNT:
    """ Adds CNT's inner conv block to the blocks `blocks` (default all) of a timm TNT, in place; returns the model.

    Args:
        model: timm's TNT (tnt_s_patch16_224, tnt_b_patch16_224, and the registered tnt_ti / nano / micro configs).
        blocks: Block indices (default all; negative from the end).
        bottleneck: ResNet's Bottleneck instead of the basic block (inner_dim divisible by 4).
        impl: How the block computes ('auto', 'conv', 'matmul'; see cnt.InnerResBlock).
        act_layer, norm_layer: The block's activation (ReLU) and norm (BatchNorm), as CNT.

    Each block's branch takes the block's drop-path rate. New keys: `blocks.{i}.inner_conv.conv_block.*`.
    """
    if type(model) is not TNT:
        raise TypeError(f'convolve_inner takes timm\'s TNT (timm.models.tnt.TNT), not {type(model).__name__}.')
    indices = resolve_indices(blocks, len(model.blocks), 'block')
    param = model.pixel_pos  # (1, inner_dim, h, w)
    for i in indices:
        block = model.blocks[i]
        drop_path = block.drop_path.drop_prob if hasattr(block.drop_path, 'drop_prob') else 0.
        branch = inner_conv_block(
            param.shape[1], model.pixel_embed.new_patch_size, bottleneck=bottleneck, impl=impl,
            act_layer=act_layer, norm_layer=norm_layer, drop_path=drop_path, device=param.device, dtype=param.dtype)
        graft(block, ConvolvedTNTBlock).inner_conv = branch.train(model.training)
    return model
