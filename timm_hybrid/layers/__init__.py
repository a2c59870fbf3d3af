""" The seeds' ideas as layers for any timm model, and the functions that insert them into a timm host.

| idea | layer (tensors) | inserted by | into |
| TransCNN's H-MHSA | `HMHSA` around `HierarchicalAttention` (NCHW) | `add_hmhsa(model, stages)` | feature_info CNNs |
| Refiner + hand-on | `RefinedAttention`, a timm Attention (B, N, C) | `refine_attention(model, blocks)` | ViT / DeiT |
| CNT's inner block | `inner_conv_block`: `InnerResBlock` (B*N, h*w, C) | `convolve_inner(model, blocks)` | timm's TNT |

Every insertion starts as the identity of its host (the new branch's last layer is zero), keeps the host's state-dict
keys (`inserted_state_keys(model)` lists the new ones), and works in place on the model it is given.
`timm_hybrid.models.hybrids` registers hosts with a layer inserted (`resnet50_hmhsa`, `deit_small_refined_patch16_224`,
`tnt_s_cnt_patch16_224`, ...), whose `pretrained=True` loads the host's timm weights.
"""
from .. import models  # noqa: F401  the families first: the registered hybrids import these layers' modules
from ._insert import inserted_state_keys
from .hmhsa import HMHSA, HierarchicalAttention, add_hmhsa, default_head_dim
from .inner_conv import ConvolvedTNTBlock, InnerResBlock, convolve_inner, inner_conv_block
from .refine import AttentionMapHandOn, AttentionRefiner, RefinedAttention, refine_attention

__all__ = [
    'AttentionMapHandOn', 'AttentionRefiner', 'ConvolvedTNTBlock', 'HMHSA', 'HierarchicalAttention', 'InnerResBlock',
    'RefinedAttention', 'add_hmhsa', 'convolve_inner', 'default_head_dim', 'inner_conv_block', 'inserted_state_keys',
    'refine_attention',
]
