""" Pieces shared by more than one family that timm.layers / timm.models do not have. """
import re
from contextlib import contextmanager, nullcontext
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models import checkpoint
from timm.models._features import feature_take_indices
from timm.models._helpers import clean_state_dict

__all__ = ['TokenClassifierMixin', 'checkpoint_keeping_bn_stats', 'prune_sequence', 'split_prefix_tokens',
           'summarize_keys', 'unwrap_checkpoint']


@contextmanager
def _batchnorm_stats_kept(module: nn.Module) -> Iterator[None]:
    """ Restores the BatchNorm running stats of `module` on exit. """
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


@torch.jit.ignore
def checkpoint_keeping_bn_stats(block: nn.Module, *args: Optional[torch.Tensor]):
    """ Gradient checkpointing of `block(*args)` that leaves BatchNorm running stats as one forward leaves them.

    Checkpointing re-runs the block in backward; in training mode its BatchNorms would update their running stats a
    second time (momentum applied twice per step), so eval outputs would depend on whether checkpointing was on.
    The re-run happens inside a context that restores the stats (non-reentrant checkpointing: the only kind that
    takes a context for the re-run).
    """
    return checkpoint(
        block, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), _batchnorm_stats_kept(block)))


def prune_sequence(model: nn.Module, attr: str, indices: Union[int, List[int]], prune_head: bool) -> List[int]:
    """ Keeps the blocks / stages `model.<attr>` up to the last of `indices`; drops the head if asked. """
    take_indices, max_index = feature_take_indices(len(getattr(model, attr)), indices)
    setattr(model, attr, getattr(model, attr)[:max_index + 1])
    if prune_head:
        model.reset_classifier(0, '')
    return take_indices


def split_prefix_tokens(
        intermediates: List[torch.Tensor],
        num_prefix_tokens: int,
        grid_size: Tuple[int, int],
        to_nchw: bool,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """ Token sequences (B, prefix + H*W, C) -> (spatial maps (B, C, H, W) or tokens (B, H*W, C), prefix tokens). """
    prefix_tokens = [y[:, 0:num_prefix_tokens] for y in intermediates]
    spatial = [y[:, num_prefix_tokens:] for y in intermediates]
    if to_nchw:
        H, W = grid_size
        spatial = [y.reshape(y.shape[0], H, W, y.shape[-1]).permute(0, 3, 1, 2).contiguous() for y in spatial]
    return spatial, prefix_tokens


def unwrap_checkpoint(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """ The model weights of a raw state dict or a training checkpoint ({'state_dict_ema' | 'model_ema' |
    'state_dict' | 'model': ...}, EMA first), without DDP's 'module.' / torch.compile's prefixes (timm's clean). """
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    return clean_state_dict(state_dict)


def summarize_keys(lines: List[str]) -> List[str]:
    """ Folds per-block lines ('blocks.3.x: ...') into one 'blocks.*.x: ... (x12)' line each. """
    counts: Dict[str, int] = {}
    for line in lines:
        folded = re.sub(r'^blocks\.\d+\.', 'blocks.*.', line)
        counts[folded] = counts.get(folded, 0) + 1
    return [f'{line} (x{n})' if n > 1 else line for line, n in counts.items()]


class TokenClassifierMixin:
    """ The timm classifier API of a class-token model with `blocks`, `norm`, `head`, `cls_token`, `embed_dim`,
    `global_pool`, `num_classes` and `grad_checkpointing` (CNT, Refiner-ViT). """

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('', 'token', 'avg'):
                raise ValueError(f"Unknown global_pool '{global_pool}', expected one of '', 'token', 'avg'.")
            self.global_pool = global_pool
        self.head = self._new_head(num_classes)

    def _new_head(self, num_classes: int) -> nn.Module:
        """ A fresh linear head on the model's device / dtype (nn.Identity for num_classes=0). """
        if num_classes <= 0:
            return nn.Identity()
        return nn.Linear(self.embed_dim, num_classes, device=self.cls_token.device, dtype=self.cls_token.dtype)

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """ Prune layers not required for specified intermediates. """
        take_indices = prune_sequence(self, 'blocks', indices, prune_head)
        if prune_norm:
            self.norm = nn.Identity()
        return take_indices
