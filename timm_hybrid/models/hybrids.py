""" Registered hybrids: timm hosts with one of the seeds' layers inserted (timm_hybrid.layers), from the host's weights.

Each is named as its host with the layer after the host's architecture name, so the host is evident:

| layer | name | hosts | inserted by | options (create_model kwargs) |
| H-MHSA | `resnet50_hmhsa` | ResNet, ConvNeXt, EfficientNet | `add_hmhsa` | `hmhsa_stages`, ... |
| Refiner | `deit_small_refined_patch16_224` | DeiT | `refine_attention` | `refine_blocks`, ... |
| CNT inner block | `tnt_s_cnt_patch16_224` | timm's TNT | `convolve_inner` | `cnt_blocks`, `cnt_bottleneck`, ... |

The options are the insertion function's arguments with the layer's prefix (timm's train.py passes them as
`--model-kwargs hmhsa_stages=(2,3)`); every other kwarg goes to the host's own entry point (num_classes, img_size,
drop_path_rate, ...).

A hybrid is its host's class with the layer inside: `build_model_with_cfg` builds it through the host's own entry point
and the insertion function, then timm's `load_pretrained` loads weights with `checkpoint_filter_fn` (the host's own
filter, then the inserted layers' tensors from the fresh model). Its pretrained cfgs are the host's, tag for tag
(`resnet50_hmhsa.a1_in1k` loads `timm/resnet50.a1_in1k`; `deit_nano_refined_patch7_28.fmnist` the packaged DeiT
weights, offline), so `pretrained=True` gives the host's logits exactly at first; a hybrid's own fine-tuned checkpoint
loads through the same filter unchanged. `features_only` uses the host's feature wrapper and out_indices.
"""
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.convnext import checkpoint_filter_fn as convnext_checkpoint_filter_fn
from timm.models.tnt import checkpoint_filter_fn as tnt_checkpoint_filter_fn
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from ..layers._insert import inserted_prefixes, inserted_state_keys
from ..layers.hmhsa import add_hmhsa
from ..layers.inner_conv import convolve_inner
from ..layers.refine import refine_attention
from ._common import check_loaded_share, describe_layout, summarize_keys, unwrap_checkpoint

__all__ = []  # registers with timm; HOSTS and checkpoint_filter_fn are used as timm_hybrid.models.hybrids.*

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostFamily:
    """ What a host's own `_create_*` passes to timm's builder besides the model args. """
    filter_fn: Optional[Callable] = None
    feature_cfg: Dict[str, Any] = field(default_factory=dict)


_RESNET = HostFamily()
_CONVNEXT = HostFamily(convnext_checkpoint_filter_fn, dict(out_indices=(0, 1, 2, 3), flatten_sequential=True))
# the host's features_only is EfficientNetFeatures (the same modules without the head); FeatureListNet over the
# classification model gives the same maps
_EFFICIENTNET = HostFamily(feature_cfg=dict(flatten_sequential=True))
_DEIT = HostFamily(partial(vit_checkpoint_filter_fn, adapt_layer_scale=True), dict(out_indices=3, feature_cls='getter'))
_VIT = HostFamily(vit_checkpoint_filter_fn, dict(out_indices=3, feature_cls='getter'))  # baselines' 28 px DeiTs
_TNT = HostFamily(tnt_checkpoint_filter_fn, dict(out_indices=3, feature_cls='getter'))

# hybrid -> (host, insertion function, its kwargs' prefix, host family)
HOSTS = {
    'resnet18_hmhsa': ('resnet18', add_hmhsa, 'hmhsa_', _RESNET),
    'resnet50_hmhsa': ('resnet50', add_hmhsa, 'hmhsa_', _RESNET),
    'convnext_atto_hmhsa': ('convnext_atto', add_hmhsa, 'hmhsa_', _CONVNEXT),
    'convnext_tiny_hmhsa': ('convnext_tiny', add_hmhsa, 'hmhsa_', _CONVNEXT),
    'efficientnet_b0_hmhsa': ('efficientnet_b0', add_hmhsa, 'hmhsa_', _EFFICIENTNET),
    'deit_tiny_refined_patch16_224': ('deit_tiny_patch16_224', refine_attention, 'refine_', _DEIT),
    'deit_small_refined_patch16_224': ('deit_small_patch16_224', refine_attention, 'refine_', _DEIT),
    'deit_base_refined_patch16_224': ('deit_base_patch16_224', refine_attention, 'refine_', _DEIT),
    'deit_nano_refined_patch7_28': ('deit_nano_patch7_28', refine_attention, 'refine_', _VIT),
    'deit_micro_refined_patch4_28': ('deit_micro_patch4_28', refine_attention, 'refine_', _VIT),
    'tnt_s_cnt_patch16_224': ('tnt_s_patch16_224', convolve_inner, 'cnt_', _TNT),
    'tnt_b_cnt_patch16_224': ('tnt_b_patch16_224', convolve_inner, 'cnt_', _TNT),
    'tnt_nano_cnt_patch7_28': ('tnt_nano_patch7_28', convolve_inner, 'cnt_', _TNT),
    'tnt_micro_cnt_patch4_28': ('tnt_micro_patch4_28', convolve_inner, 'cnt_', _TNT),
}


def checkpoint_filter_fn(
        state_dict: Dict[str, Any],
        model: nn.Module,
        host_filter_fn: Optional[Callable] = None,
) -> Dict[str, torch.Tensor]:
    """ A host checkpoint (or the hybrid's own) for the hybrid `model`.

    The host's own filter first (position-embedding resampling, official-key conversion, ...); then every tensor of
    the inserted layers that the checkpoint lacks is taken from `model` itself, at its identity start, and logged, so
    timm's strict load still names any host tensor that does not fit. A ValueError names the layout seen when less
    than half the model's weights would come from the checkpoint (a checkpoint of another host).
    """
    state_dict = unwrap_checkpoint(state_dict)
    layout = describe_layout(state_dict)
    if host_filter_fn is not None:
        state_dict = host_filter_fn(state_dict, model)
    model_state = model.state_dict()
    check_loaded_share(state_dict, model, layout, [
        k for k, v in state_dict.items() if k not in model_state or model_state[k].shape != v.shape])
    kept = [k for k in inserted_state_keys(model) if k not in state_dict]
    if kept:
        layers = [p for p in inserted_prefixes(model) if any(k == p or k.startswith(p + '.') for k in kept)]
        _logger.warning(
            f'{type(model).__name__} from a host checkpoint: the inserted layers start as the identity ({len(kept)} '
            f'tensors of ' + ', '.join(summarize_keys(layers)) + ').')
        state_dict.update({k: model_state[k] for k in kept})
    return state_dict


def _host_cfgs(hybrid: str) -> Dict[str, Dict[str, Any]]:
    """ The host's pretrained cfgs under the hybrid's name, one per host tag, the host's default first. The origin goes
    to `notes`: `origin_url` marks an official release for `timm-hybrid publish`, and a hybrid has no weights of its
    own to publish. """
    host = HOSTS[hybrid][0]
    default_tag = get_pretrained_cfg(host).tag
    tags = [default_tag] + [n.split('.', 1)[1] for n in timm.list_models(host, include_tags=True)
                            if '.' in n and n.split('.', 1)[1] != default_tag]
    cfgs = {}
    for tag in tags:
        cfg = get_pretrained_cfg(f'{host}.{tag}' if tag else host).to_dict()
        origin = cfg.pop('origin_url', None)
        host_tag = f'{host}.{tag}' if tag else host
        notes = (f'Weights of the host, {host_tag}; the inserted layers start as the identity.',)
        cfg['notes'] = tuple(cfg.get('notes') or ()) + notes + ((f'Host origin: {origin}',) if origin else ())
        cfgs[f'{hybrid}.{tag}' if tag else hybrid] = cfg
    return cfgs


default_cfgs = generate_default_cfgs({k: v for hybrid in HOSTS for k, v in _host_cfgs(hybrid).items()})


def _create_hybrid(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    host, insert, prefix, family = HOSTS[variant]
    insert_kwargs = {k[len(prefix):]: kwargs.pop(k) for k in list(kwargs) if k.startswith(prefix)}
    host_entrypoint = timm.models.model_entrypoint(host)

    def build(**host_kwargs) -> nn.Module:
        return insert(host_entrypoint(pretrained=False, **host_kwargs), **insert_kwargs)

    return build_model_with_cfg(
        build, variant, pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, host_filter_fn=family.filter_fn),
        feature_cfg=dict(family.feature_cfg),
        **kwargs,
    )


@register_model
def resnet18_hmhsa(pretrained: bool = False, **kwargs) -> nn.Module:
    """ ResNet-18 with H-MHSA after layer3 (7x7 windows, keys pooled by 2) and layer4 (global MHSA). """
    return _create_hybrid('resnet18_hmhsa', pretrained=pretrained, **kwargs)


@register_model
def resnet50_hmhsa(pretrained: bool = False, **kwargs) -> nn.Module:
    """ ResNet-50 with H-MHSA after layer3 (7x7 windows, keys pooled by 2) and layer4 (global MHSA). """
    return _create_hybrid('resnet50_hmhsa', pretrained=pretrained, **kwargs)


@register_model
def convnext_atto_hmhsa(pretrained: bool = False, **kwargs) -> nn.Module:
    """ ConvNeXt-Atto with H-MHSA after stages 2 and 3. """
    return _create_hybrid('convnext_atto_hmhsa', pretrained=pretrained, **kwargs)


@register_model
def convnext_tiny_hmhsa(pretrained: bool = False, **kwargs) -> nn.Module:
    """ ConvNeXt-T with H-MHSA after stages 2 and 3. """
    return _create_hybrid('convnext_tiny_hmhsa', pretrained=pretrained, **kwargs)


@register_model
def efficientnet_b0_hmhsa(pretrained: bool = False, **kwargs) -> nn.Module:
    """ EfficientNet-B0 with H-MHSA after its reduction-16 and reduction-32 stages (blocks.4, blocks.6). """
    return _create_hybrid('efficientnet_b0_hmhsa', pretrained=pretrained, **kwargs)


@register_model
def deit_tiny_refined_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """ DeiT-Ti with every block's attention maps refined and handed on. """
    return _create_hybrid('deit_tiny_refined_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def deit_small_refined_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """ DeiT-S with every block's attention maps refined and handed on. """
    return _create_hybrid('deit_small_refined_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def deit_base_refined_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """ DeiT-B with every block's attention maps refined and handed on. """
    return _create_hybrid('deit_base_refined_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def deit_nano_refined_patch7_28(pretrained: bool = False, **kwargs) -> nn.Module:
    """ The 28 px Fashion-MNIST DeiT (deit_nano_patch7_28) with refined, handed-on attention maps. """
    return _create_hybrid('deit_nano_refined_patch7_28', pretrained=pretrained, **kwargs)


@register_model
def deit_micro_refined_patch4_28(pretrained: bool = False, **kwargs) -> nn.Module:
    """ deit_micro_patch4_28 with refined, handed-on attention maps. """
    return _create_hybrid('deit_micro_refined_patch4_28', pretrained=pretrained, **kwargs)


@register_model
def tnt_s_cnt_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """ TNT-S with CNT's inner conv block beside the inner transformer of every block. """
    return _create_hybrid('tnt_s_cnt_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def tnt_b_cnt_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """ TNT-B with CNT's inner conv block beside the inner transformer of every block. """
    return _create_hybrid('tnt_b_cnt_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def tnt_nano_cnt_patch7_28(pretrained: bool = False, **kwargs) -> nn.Module:
    """ The 28 px Fashion-MNIST TNT (tnt_nano_patch7_28) with CNT's inner conv block in every block. """
    return _create_hybrid('tnt_nano_cnt_patch7_28', pretrained=pretrained, **kwargs)


@register_model
def tnt_micro_cnt_patch4_28(pretrained: bool = False, **kwargs) -> nn.Module:
    """ tnt_micro_patch4_28 with CNT's inner conv block in every block. """
    return _create_hybrid('tnt_micro_cnt_patch4_28', pretrained=pretrained, **kwargs)
