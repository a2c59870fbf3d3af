""" H-MHSA as a layer for any timm CNN: TransCNN / HAT-Net's hierarchical attention as a residual after a stage.

TransCNN's paper (arXiv:2106.03180) calls its H-MHSA "readily pluggable into any CNN architecture"; here it is:

    stage output x (B, C, H, W)
      -> x + HierarchicalAttention(x)     norm -> window MHSA in window_size^2 cells -> every position attends over the
                                          map average-pooled by pool_ratio -> 1x1 projection (zero at insertion)

`HierarchicalAttention` is the family's own module (timm_hybrid/models/transcnn.py): any H, W (maps padded to whole
windows with the padding masked out, partial pooling cells averaged over their valid pixels), fused attention. Its
output projection starts at zero, so `add_hmhsa` leaves the host's outputs exactly as they were (x + 0); training moves
away from there: the projection gets gradients on the first step, the rest of the branch from the second.
"""
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from timm.layers import DropPath, get_norm_layer, trunc_normal_

from ..models.transcnn import HierarchicalAttention
from ._insert import resolve_indices

__all__ = ['HMHSA', 'HierarchicalAttention', 'add_hmhsa', 'default_head_dim']

HEAD_DIMS = (64, 32, 16, 8)


def default_head_dim(dim: int) -> int:
    """ TransCNN's 64 channels per head where `dim` allows, else the largest of 32 / 16 / 8 that divides it, else one
    head (ConvNeXt-Atto's 160 / 320 channels: 32 / 64; EfficientNet-B0's 112: 16). """
    return next((d for d in HEAD_DIMS if dim % d == 0), dim)


class HMHSA(nn.Module):
    """ x + H-MHSA(x) on an NCHW map: (B, C, H, W) -> (B, C, H, W), any H, W >= 1.

    window_size > 1: window attention in window_size^2 cells, then global attention over the map pooled by
    pool_ratio (TransCNN's stages 1-3); window_size == 1: plain global MHSA over every position (its last stage).
    The attention's output projection is zero-initialised: the layer starts as the identity.
    """
    inserted_names = ('',)  # the whole module is new to its host

    def __init__(
            self,
            dim: int,
            head_dim: Optional[int] = None,
            window_size: int = 7,
            pool_ratio: int = 2,
            norm_layer: Union[str, Callable[..., nn.Module]] = 'groupnorm1',
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Channels of the map.
            head_dim: Channels per head (default: `default_head_dim(dim)`).
            window_size: Side of the local attention's cells; 1 for plain global MHSA.
            pool_ratio: Average-pooling ratio of the global keys / values.
            norm_layer: Norm of the attention's inputs; default GroupNorm(1, C) as HAT-Net (batch-size independent,
                so fine-tuning at small batches is not at the mercy of BatchNorm statistics).
            drop_path: Stochastic depth of the branch.
        """
        super().__init__()
        self.attn = HierarchicalAttention(
            dim, head_dim=head_dim or default_head_dim(dim), window_size=window_size, pool_ratio=pool_ratio,
            norm_layer=get_norm_layer(norm_layer), device=device, dtype=dtype)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        # TransCNN's init for the 1x1 convs (trunc-normal .02), then the output projection at zero: the identity
        for m in self.attn.modules():
            if isinstance(m, nn.Conv2d):
                trunc_normal_(m.weight, std=.02)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.attn.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the attention's output is channels-last; a sum takes its first operand's layout, so the host's stays
        return x + self.drop_path(self.attn(x))


def _stage_container(model: nn.Module, module_name: str) -> nn.Sequential:
    """ The nn.Sequential whose output is the stage's: the stage itself (ResNet's layerN, EfficientNet's blocks.N) or
    its `blocks` (ConvNeXt's stages.N). An appended child runs last and keeps every host key. """
    stage = model.get_submodule(module_name)
    for container in (stage, getattr(stage, 'blocks', None)):
        if isinstance(container, nn.Sequential):
            return container
    raise TypeError(
        f'add_hmhsa: feature level {module_name!r} of {type(model).__name__} is a {type(stage).__name__}, neither an '
        f'nn.Sequential nor a stage with an nn.Sequential `blocks` (ResNet, ConvNeXt, EfficientNet and most timm '
        f'CNNs are); choose other stages.')


def add_hmhsa(
        model: nn.Module,
        stages: Union[int, Sequence[int]] = (-2, -1),
        head_dim: Optional[int] = None,
        window_size: Union[int, Sequence[int]] = 7,
        pool_ratio: Optional[Union[int, Sequence[int]]] = None,
        norm_layer: Union[str, Callable[..., nn.Module]] = 'groupnorm1',
        drop_path: float = 0.,
) -> nn.Module:
    """ Appends an `HMHSA` to the end of feature levels `stages` of a timm CNN, in place; returns the model.

    Args:
        model: A timm CNN with `feature_info` (ResNet, ConvNeXt, EfficientNet, ...), before any features_only wrap.
        stages: Indices into `model.feature_info`, as timm's `out_indices` (negative from the end). Default: the last
            two levels (reductions 16 and 32 of the usual timm CNN).
        head_dim: Channels per head (default per level: `default_head_dim`).
        window_size: Local window side (one, or one per stage). At a level whose keys are not pooled (pool_ratio 1)
            the layer is TransCNN's last-stage global MHSA and the window is not used.
        pool_ratio: Key / value pooling per stage; default 32 // reduction (TransCNN's 8, 4, 2, 1 at reductions
            4 .. 32): every level's global attention sees the map of the reduction-32 level.
        norm_layer: Norm of the attention inputs (default GroupNorm(1, C)).
        drop_path: Stochastic depth of the branches.

    The new child is `hmhsa` of the stage's nn.Sequential (e.g. `layer3.hmhsa` in a ResNet), so the host's state-dict
    keys are unchanged; `forward_intermediates`, `features_only` (feature hooks at the stage), gradient checkpointing
    (timm's checkpoint_seq over the stage's children) and FX see it as part of the stage.
    """
    feature_info = getattr(model, 'feature_info', None)
    if not isinstance(feature_info, (list, tuple)) or not feature_info:
        raise TypeError(f'add_hmhsa needs a timm CNN with a feature_info list; {type(model).__name__} has '
                        f'{type(feature_info).__name__}.')
    levels = resolve_indices(stages, len(feature_info), 'stage')
    window_sizes = _per_stage(window_size, levels, 'window_size')
    pool_ratios = _per_stage(pool_ratio, levels, 'pool_ratio')
    for level, window, ratio in zip(levels, window_sizes, pool_ratios):
        info = feature_info[level]
        container = _stage_container(model, info['module'])
        if 'hmhsa' in container._modules:
            raise ValueError(f'add_hmhsa: {info["module"]} already has an H-MHSA layer.')
        ratio = ratio or max(1, 32 // info['reduction'])
        param = next(container.parameters(), None)
        layer = HMHSA(
            info['num_chs'], head_dim=head_dim, window_size=window if ratio > 1 else 1, pool_ratio=ratio,
            norm_layer=norm_layer, drop_path=drop_path,
            device=param.device if param is not None else None, dtype=param.dtype if param is not None else None)
        container.add_module('hmhsa', layer.train(model.training))
    return model


def _per_stage(value, levels: Sequence[int], name: str) -> list:
    if value is None or isinstance(value, int):
        return [value] * len(levels)
    if len(value) != len(levels):
        raise ValueError(f'{name} has {len(value)} values for {len(levels)} stages.')
    return list(value)
