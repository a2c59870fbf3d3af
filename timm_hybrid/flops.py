""" Complete FLOP counting with fvcore.

fvcore's FlopCountAnalysis counts matmul / conv / norm work per traced aten op, but silently skips ops it has no
handle for. The one that matters here is timm's default fused attention, `aten::scaled_dot_product_attention`: plain
fvcore reads DeiT-S as 4.25 GMACs instead of 4.61. `count_flops` registers handles for such ops and refuses (or warns
loudly about) any remaining uncounted op that is not elementwise or data movement, so a figure is never silently low.

Unit: fvcore's, one multiply-add = 1 "flop"; reported as GMACs.
"""
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

with warnings.catch_warnings():
    # fvcore.nn scripts its focal losses at import; torch >= 2.9 deprecates torch.jit.script with a FutureWarning
    # that every command would print, about code we never call
    warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

__all__ = ['FlopCount', 'UncountedOpError', 'count_flops', 'sdpa_flop_jit', 'EXTRA_OP_HANDLES']

_logger = logging.getLogger(__name__)


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """ aten::scaled_dot_product_attention: q @ k^T (L*S*E MACs) and attn @ v (L*S*Ev MACs) per batch and head. """
    q_shape, k_shape, v_shape = (get_shape(v) for v in inputs[:3])
    *batch, L, E = q_shape
    S, Ev = k_shape[-2], v_shape[-1]
    batch_size = 1
    for b in batch:
        batch_size *= b
    return Counter({'scaled_dot_product_attention': batch_size * L * S * (E + Ev)})


EXTRA_OP_HANDLES = {
    'aten::scaled_dot_product_attention': sdpa_flop_jit,
}

# Ops fvcore has no handle for that do no matrix or conv work: elementwise maths, reductions, data movement. (Those
# in fvcore's own ignore list, e.g. aten::relu / view / cat, never reach `unsupported_ops` and are not repeated.)
# They stay uncounted (as in fvcore and the published figures) but are listed in `FlopCount.uncounted`.
ELEMENTWISE_OPS = frozenset(f'aten::{name}' for name in (
    'add', 'add_', 'sub', 'sub_', 'mul', 'mul_', 'div', 'div_', 'neg', 'rsub', 'pow', 'sqrt', 'rsqrt', 'exp', 'log',
    'abs', 'sign', 'clamp_min', 'clamp_min_', 'clamp_max', 'sigmoid', 'sigmoid_', 'tanh', 'tanh_', 'relu6', 'gelu',
    'gelu_', 'silu', 'silu_', 'hardswish', 'hardswish_', 'hardsigmoid', 'elu', 'leaky_relu', 'leaky_relu_', 'softmax',
    'log_softmax', 'dropout_', 'feature_dropout', 'erf', 'ceil', 'round', 'fill_', 'zero_', 'ones_like', 'mean', 'sum',
    'min', 'amax', 'var', 'std', 'norm', 'linalg_vector_norm', 'cumsum', 'ne', 'lt', 'le', 'where', 'masked_fill_',
    'avg_pool2d', 'max_pool2d', 'adaptive_max_pool2d', 'pad', 'reflection_pad2d', 'replication_pad2d', 'pixel_shuffle',
    'pixel_unshuffle', 'im2col', 'col2im', 'flip', 'repeat', 'repeat_interleave', 'expand_as', 'index_select',
    'index_add', 'scatter', 'scatter_add', 'clone', 'unflatten', 'linspace', 'meshgrid', 'sin', 'cos', 'bernoulli_',
    'rand', 'randn', 'topk', 'sort', 'argmax', 'softplus', 'mish', 'hardtanh', 'hardtanh_', 'upsample_nearest2d',
    'channel_shuffle', 'native_dropout', 'alias', 'lift_fresh', 'numpy_T', 'mT', 'reciprocal', 'square', 'logsumexp',
    'batch_norm_elemt',
))


class UncountedOpError(RuntimeError):
    """ The model uses an operator that does matrix or conv work but that fvcore cannot count. """


@dataclass
class FlopCount:
    """ Result of `count_flops`. `gmacs` is per image (fvcore unit: 1 multiply-add = 1). """
    gmacs: float
    params: int
    input_size: Tuple[int, ...]
    by_operator: Dict[str, float] = field(default_factory=dict)  # GMACs per counted operator kind
    by_module: Dict[str, float] = field(default_factory=dict)  # GMACs per top-level child module
    uncounted: Dict[str, int] = field(default_factory=dict)  # elementwise ops left uncounted -> occurrences
    unsupported: Dict[str, int] = field(default_factory=dict)  # non-elementwise ops fvcore could not count

    @property
    def train_gmacs(self) -> float:
        """ Forward + backward per image by the usual 3x rule (backward = 2x forward: grads of inputs and weights),
        the convention of Kaplan et al. 2020 and of the DeiT / TNT training-cost figures. """
        return 3 * self.gmacs

    @property
    def mparams(self) -> float:
        return self.params / 1e6


def count_flops(
        model_or_name: Union[str, nn.Module],
        input_size: Optional[Tuple[int, int, int]] = None,
        strict: bool = True,
        **create_kwargs,
) -> FlopCount:
    """ Count GMACs (per image) and params of a model with fvcore, attention matmuls included.

    Args:
        model_or_name: A model, or a name for `timm.create_model` (then `create_kwargs` are passed on).
        input_size: (C, H, W) of the single input image; by default the model's own (timm's
            `get_model_input_config`: its cfg's size, or the `img_size` / `in_chans` it was built with), so a 28 px
            model is counted at 28 px. A module with no pretrained cfg defaults to 3x224x224.
        strict: Raise `UncountedOpError` if an op that is neither counted nor elementwise shows up; with False, log
            a warning and report it in `unsupported`.
    """
    import timm
    from timm.models import get_model_input_config

    if isinstance(model_or_name, str):
        model = timm.create_model(model_or_name, **create_kwargs)
    else:
        if create_kwargs:
            raise TypeError(f'create_kwargs {sorted(create_kwargs)} only apply when a model name is given.')
        model = model_or_name
    if input_size is None:
        input_size = get_model_input_config(model)['input_size']
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        x = torch.zeros((1, *input_size), device=param.device if param is not None else None)
        analysis = FlopCountAnalysis(model, x)
        analysis.set_op_handle(**EXTRA_OP_HANDLES)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        total = analysis.total()
        by_operator = {k: v / 1e9 for k, v in analysis.by_operator().items()}
        by_module = {k: v / 1e9 for k, v in analysis.by_module().items() if k and '.' not in k}
        unsupported_all = dict(analysis.unsupported_ops())
    finally:
        model.train(was_training)

    uncounted = {k: n for k, n in unsupported_all.items() if k in ELEMENTWISE_OPS}
    unsupported = {k: n for k, n in unsupported_all.items() if k not in ELEMENTWISE_OPS}
    if unsupported:
        msg = (f'{type(model).__name__}: fvcore could not count {sorted(unsupported)}; the GMACs figure would be too '
               f'low. Register an op handle in timm_hybrid.flops.EXTRA_OP_HANDLES (or add the op to ELEMENTWISE_OPS '
               f'if it does no matrix work).')
        if strict:
            raise UncountedOpError(msg)
        _logger.warning(msg)
    return FlopCount(
        gmacs=total / 1e9,
        params=sum(p.numel() for p in model.parameters()),
        input_size=tuple(input_size),
        by_operator=by_operator,
        by_module=by_module,
        uncounted=uncounted,
        unsupported=unsupported,
    )
