""" Baseline configs for the CNT comparison, built from timm's own TNT and VisionTransformer (DeiT) classes.

Nothing here re-implements TNT or DeiT: each entry point is a config of timm's class, registered so that the
comparison sizes timm lacks exist by name:

* `tnt_ti_patch16_224`: TNT-Ti of the TNT paper (embed 192, inner 12, 3 heads), the compute reference of `cnt_ti`.
* `*_nano_patch7_28`: 28x28 single-channel (Fashion-MNIST) variants of DeiT, TNT and CNT at matched fvcore GMACs.
  A 28 px image is cut into 4x4 patches of 7x7 pixels (16 patch tokens); the pixel embedding conv has stride 2, so
  each patch carries a 4x4 grid of pixel embeddings, the same grid as TNT-S at 224 (16x16 patches, stride 4).
* `*_micro_patch4_28`: the Fashion-MNIST study's models with the 224 px models' token structure: 7x7 = 49 patches of
  4x4 pixels and a stride-1 pixel embedding, so each patch carries a 4x4 grid of pixel embeddings made from its own
  16 pixels (the nano models' stride 2 gives a 4x4 grid too, but from a 7x7 patch: each pixel embedding overlaps its
  neighbours). Sizes, depth 4 for all:

  | model | outer / inner width, heads | fvcore GMACs | params (M) | train img/s, 1 thread, at sizing time |
  | tnt_micro_patch4_28  | 64 / 4, 2 outer / 1 inner | 0.01370 | 0.226 | ~220-290 |
  | cnt_micro_patch4_28  | 64 / 4, 2                 | 0.01352 | 0.227 | ~330     |
  | deit_micro_patch4_28 | 70, 2                     | 0.01337 | 0.245 | ~470     |

  (Today's side-by-side figures are in benchmarks/results/compare_micro: with CNT's row BatchNorm CNT trained at
  about DeiT's speed on a host with slow GEMMs, at 0.79x on one whose GEMMs run 3x as fast.)

  Why: TNT keeps its own inner-to-outer width ratio (TNT-Ti 12 / 192, TNT-S 24 / 384: 1/16), so 4 / 64 with one
  inner head of dim 4. CNT takes the same widths: on 4 channels its 3x3 basic block costs about what TNT's inner
  attention + MLP on 16 pixels do. DeiT is widened to 70 to match (GMACs within 2.5%, params within 8.1%;
  tests/test_micro.py holds 3% / 10%). Depth 4 (nano: 6) keeps a 10%-data run of 100 epochs near half an hour on
  one thread (batch 128, img/s above measured on this shared 2-core machine; 5000 validation images every 2nd epoch
  add ~15%): about 23 min for DeiT, 32 for CNT, 38-48 for TNT, whose time goes into its inner transformer (its speed
  barely moved between outer widths 48 and 64), so a cheaper TNT would have had to lose depth or inner width.
"""
from pathlib import Path
from typing import Any, Dict

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.tnt import TNT, checkpoint_filter_fn as tnt_checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn as vit_checkpoint_filter_fn

from ..data import (
    FASHION_MNIST_INPUT_SIZE, FASHION_MNIST_LABEL_NAMES, FASHION_MNIST_MEAN, FASHION_MNIST_NUM_CLASSES,
    FASHION_MNIST_STD,
)

__all__ = []


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5),
        'license': 'apache-2.0',
        **kwargs,
    }


def nano_cfg(**kwargs) -> Dict[str, Any]:
    """ Pretrained cfg of the 28x28 Fashion-MNIST variants, nano and micro (shared with cnt.py). """
    return _cfg(
        num_classes=FASHION_MNIST_NUM_CLASSES, input_size=FASHION_MNIST_INPUT_SIZE, crop_pct=1.0,
        mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, label_names=FASHION_MNIST_LABEL_NAMES,
        **kwargs,
    )


# Weight folders that ship in the wheel as package data (timm_hybrid/weights/<arch>.<tag>/, written by export)
PACKAGED_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / 'weights'


def packaged_weights(arch: str, tag: str = 'fmnist') -> Dict[str, str]:
    """ Where the weights of a tag that ships in the wheel come from (shared with cnt.py): timm's `file`, which its
    builder loads before `hf_hub_id`, so the tag loads offline from the installed package; `hf_hub_id` names the
    published copy (`timm.create_model('hf-hub:...')`). Nothing while the package holds no folder for the tag (a
    study has not exported it yet): such a tag has no source, and `pretrained=True` says that no weights exist. """
    name = f'{arch}.{tag}'
    file = PACKAGED_WEIGHTS_DIR / name / 'model.safetensors'
    if not file.is_file():
        return {}
    return dict(file=str(file), hf_hub_id=f'timm-hybrid/{name}')


_TNT_CFG = dict(first_conv='pixel_embed.proj', classifier='head', paper_ids='arXiv:2103.00112',
                paper_name='Transformer in Transformer')
_DEIT_CFG = dict(first_conv='patch_embed.proj', classifier='head', paper_ids='arXiv:2012.12877',
                 paper_name='Training data-efficient image transformers & distillation through attention')

default_cfgs = generate_default_cfgs({
    'tnt_ti_patch16_224': _cfg(**_TNT_CFG),
    # 28 px Fashion-MNIST weights, in the wheel (TNT-Ti at 224 has no weights, so no source)
    'tnt_nano_patch7_28.fmnist': nano_cfg(**packaged_weights('tnt_nano_patch7_28'), **_TNT_CFG),
    'deit_nano_patch7_28.fmnist': nano_cfg(**packaged_weights('deit_nano_patch7_28'), **_DEIT_CFG),
    'deit_nano_distilled_patch7_28.fmnist': nano_cfg(
        **packaged_weights('deit_nano_distilled_patch7_28'), **dict(_DEIT_CFG, classifier=('head', 'head_dist'))),
    # micro: the folders `benchmarks/fmnist_micro_study.py publish` has written (no source until then)
    'tnt_micro_patch4_28.fmnist': nano_cfg(**packaged_weights('tnt_micro_patch4_28'), **_TNT_CFG),
    'deit_micro_patch4_28.fmnist': nano_cfg(**packaged_weights('deit_micro_patch4_28'), **_DEIT_CFG),
    'deit_micro_distilled_patch4_28.fmnist': nano_cfg(
        **packaged_weights('deit_micro_distilled_patch4_28'), **dict(_DEIT_CFG, classifier=('head', 'head_dist'))),
})


# 28 px nano sizes: depth 6, 16 patch tokens; widths matched in fvcore GMACs (see the README's table)
_NANO_TNT = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, inner_dim=8, depth=6,
                 num_heads_outer=2, num_heads_inner=2, first_stride=2)
_NANO_DEIT = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=80, depth=6, num_heads=2)
# 28 px micro sizes: why these widths and depth, in the module docstring
_MICRO_TNT = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, inner_dim=4, depth=4,
                  num_heads_outer=2, num_heads_inner=1, first_stride=1)
_MICRO_DEIT = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=70, depth=4, num_heads=2)


# Each registered variant's constructor arguments (as timm's levit.py keeps its `model_cfgs`); `distilled` picks
# VisionTransformerDistilled. A model function's kwargs override them.
_MODEL_ARGS = {
    'tnt_ti_patch16_224': dict(patch_size=16, embed_dim=192, inner_dim=12, depth=12, num_heads_outer=3, qkv_bias=False),
    'tnt_nano_patch7_28': _NANO_TNT,
    'deit_nano_patch7_28': _NANO_DEIT,
    'deit_nano_distilled_patch7_28': dict(_NANO_DEIT, distilled=True),
    'tnt_micro_patch4_28': _MICRO_TNT,
    'deit_micro_patch4_28': _MICRO_DEIT,
    'deit_micro_distilled_patch4_28': dict(_MICRO_DEIT, distilled=True),
}


def _create_tnt(variant: str, pretrained: bool = False, **kwargs) -> TNT:
    kwargs = dict(_MODEL_ARGS[variant], **kwargs)
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        TNT, variant, pretrained,
        pretrained_filter_fn=tnt_checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs)


def _create_deit(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    kwargs = dict(_MODEL_ARGS[variant], **kwargs)
    distilled = kwargs.pop('distilled', False)
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        VisionTransformerDistilled if distilled else VisionTransformer, variant, pretrained,
        pretrained_filter_fn=vit_checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs)


@register_model
def tnt_ti_patch16_224(pretrained: bool = False, **kwargs) -> TNT:
    """ TNT-Ti (TNT paper, Table 1): timm's TNT at embed 192, inner 12, 3 outer heads. """
    return _create_tnt('tnt_ti_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def tnt_nano_patch7_28(pretrained: bool = False, **kwargs) -> TNT:
    """ TNT for 28x28 grayscale: 16 patches of 7x7 px, a 4x4 pixel grid each. """
    return _create_tnt('tnt_nano_patch7_28', pretrained=pretrained, **kwargs)


@register_model
def deit_nano_patch7_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ DeiT for 28x28 grayscale: 16 patches of 7x7 px. """
    return _create_deit('deit_nano_patch7_28', pretrained=pretrained, **kwargs)


@register_model
def deit_nano_distilled_patch7_28(pretrained: bool = False, **kwargs) -> VisionTransformerDistilled:
    """ DeiT for 28x28 grayscale with a distillation token. """
    return _create_deit('deit_nano_distilled_patch7_28', pretrained=pretrained, **kwargs)


@register_model
def tnt_micro_patch4_28(pretrained: bool = False, **kwargs) -> TNT:
    """ TNT for 28x28 grayscale: 49 patches of 4x4 px, each pixel its own inner token (a 4x4 grid per patch). """
    return _create_tnt('tnt_micro_patch4_28', pretrained=pretrained, **kwargs)


@register_model
def deit_micro_patch4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ DeiT for 28x28 grayscale: 49 patches of 4x4 px, matched in GMACs to tnt_micro_patch4_28. """
    return _create_deit('deit_micro_patch4_28', pretrained=pretrained, **kwargs)


@register_model
def deit_micro_distilled_patch4_28(pretrained: bool = False, **kwargs) -> VisionTransformerDistilled:
    """ deit_micro_patch4_28 with a distillation token. """
    return _create_deit('deit_micro_distilled_patch4_28', pretrained=pretrained, **kwargs)
