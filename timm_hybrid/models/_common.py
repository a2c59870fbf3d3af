""" Pieces shared by more than one family that timm.layers / timm.models do not have. """
import copy
import math
import numbers
import os
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import Mlp, _assert, register_notrace_function, resample_abs_pos_embed, to_2tuple
from timm.models import build_model_with_cfg, checkpoint, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from timm.models._helpers import clean_state_dict
from timm.models._input import update_model_input_size

__all__ = [
    'act_for', 'ActRecomputingMlp', 'batch_norm_grad_coefficients', 'bn_scale_shift', 'build_token_model',
    'build_with_official_weights', 'check_global_pool', 'check_image_batch', 'check_int', 'check_ints',
    'check_loaded_share', 'check_positive', 'check_rate', 'check_recompute_setting', 'check_token_model_args',
    'checkpoint_keeping_bn_stats', 'conv2d_with', 'conv_norm_acts_eval', 'conv_norm_eval', 'conv_norm_weights',
    'cpu_chunk_size', 'cpu_untraced', 'describe_layout', 'eager_on_cpu', 'fold_conv_norm', 'folds_into_conv',
    'group_prefix', 'grouped_affine', 'grouped_norm', 'grouped_norm_grad_sums', 'grouped_norm_input_grad',
    'grouped_norm_stats', 'has_running_stats', 'merge_group_stats', 'MIN_LOADED_SHARE', 'norm_act_remainder',
    'norm_conv1x1_eval', 'norm_conv1x1_weights', 'norm_folds_into_conv1x1', 'norm_scale_shift',
    'official_weights_cache_file', 'out_of_place', 'patch_grid', 'PatchGridEmbed', 'per_group',
    'PretrainedWeightsUnavailable', 'prune_sequence', 'RECOMPUTE_SETTINGS', 'recomputes', 'resample_token_pos',
    'size_mismatch_message', 'source_token_grid', 'split_prefix_tokens', 'summarize_keys', 'token_model_cfg',
    'TokenClassifierMixin', 'unwrap_checkpoint', 'update_running_stats', 'weights_source_hint',
]


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
def checkpoint_keeping_bn_stats(block: nn.Module, *args: Optional[torch.Tensor], run: Optional[Callable] = None):
    """ Gradient checkpointing of `block(*args)` (or `run(*args)`, a computation of `block`'s modules) that leaves
    BatchNorm running stats as one forward leaves them.

    Checkpointing re-runs the block in backward; in training mode its BatchNorms would update their running stats a
    second time (momentum applied twice per step), so eval outputs would depend on whether checkpointing was on.
    The re-run happens inside a context that restores the stats (non-reentrant checkpointing: the only kind that
    takes a context for the re-run).
    """
    return checkpoint(
        run or block, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), _batchnorm_stats_kept(block)))


# What a recompute option takes: True / False everywhere, or 'cpu': for CPU tensors only (accelerators have no page
# faults to save and pay a recompute in kernel launches). A string, not None, so timm.create_model passes it on.
RECOMPUTE_SETTINGS = (True, False, 'cpu')


def check_recompute_setting(name: str, value: Any) -> Union[bool, str]:
    if not (isinstance(value, bool) or value == 'cpu'):
        raise ValueError(f'{name} must be one of {RECOMPUTE_SETTINGS}, got {value!r}.')
    return value


@torch.jit.unused
def traced_or_compiling() -> bool:
    """ Whether fx / jit tracing or torch.compile is running the module: eager-only choices step aside. """
    return is_fx_symbolic_tracing() or torch.jit.is_tracing() or torch.compiler.is_compiling()


@torch.jit.unused
def eager_backward_needs(*tensors: torch.Tensor) -> bool:
    """ Whether an eager forward (not fx / jit traced or compiled) builds a graph for the gradient of any of
    `tensors`: grad enabled and one of them requires it. """
    # the tracers first: a traced tensor's requires_grad cannot steer Python control flow
    if traced_or_compiling():
        return False
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@torch.jit.unused
def recomputes(setting: Union[bool, str], training: bool, x: torch.Tensor) -> bool:
    """ Whether a module with this recompute setting recomputes for input `x`: in an eager training step that needs
    x's gradient, everywhere (True) or for CPU tensors ('cpu'); never under fx / jit tracing or torch.compile. """
    if setting is False or not training or not eager_backward_needs(x):
        return False
    return setting is True or x.device.type == 'cpu'


def out_of_place(act: nn.Module) -> nn.Module:
    """ `act` itself, or where it was built in place (timm's blocks build ReLUs so) a shallow copy that runs out of
    place, sharing its parameters. For inputs that autograd needs again, or views: an in-place op on a view is
    recorded as CopySlices, whose backward clones the gradient of the view's base. """
    if not getattr(act, 'inplace', False):
        return act
    act = copy.copy(act)
    act.inplace = False
    return act


@torch.jit.unused
def act_for(x: torch.Tensor, act: nn.Module) -> nn.Module:
    """ The act to run on `x`: `act` as built, or out of place where an eager backward will need x's gradient and
    act's own gradient needs its input. Autograd keeps the input of such an act run in place (SiLU, hardswish; in
    PyTorch 2.14 hardtanh / ReLU6 too) as a clone: the memory of the out-of-place act and one pass more over the map.
    ReLU's gradient needs only its output, so it stays in place. HAT-Net-S's CPU training step (batch 32, 2 threads)
    ran 1.04x as fast with its 33 SiLUs out of place with glibc keeping freed memory, 1.06x with glibc's defaults
    (scratch A/Bs, 4 rounds each, DeiT-S in the same rounds). """
    if type(act) is nn.ReLU or not getattr(act, 'inplace', False) or not eager_backward_needs(x):
        return act
    return out_of_place(act)


def _gelu_approximation(act: nn.Module) -> Optional[str]:
    """ torch's GELU's `approximate` ('none' / 'tanh'), or None for any other activation. """
    return act.approximate if type(act) is nn.GELU else None


class _ActThenLinear(torch.autograd.Function):
    """ linear(act(a), weight, bias) that saves `a` and `weight` only: backward recomputes act(a). """

    @staticmethod
    def forward(ctx, a: torch.Tensor, act: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        ctx.act = act
        ctx.save_for_backward(a, weight)
        return F.linear(act(a), weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, weight = ctx.saved_tensors
        needs_a, _, needs_weight, needs_bias = ctx.needs_input_grad
        rows = grad.reshape(-1, grad.shape[-1])
        grad_bias = rows.sum(0) if needs_bias else None
        approximate = _gelu_approximation(ctx.act)
        if approximate is None:  # any other activation: its own backward through autograd
            with torch.enable_grad():
                a = a.detach().requires_grad_(needs_a)
                hidden = ctx.act(a)
            grad_weight = rows.t() @ hidden.detach().reshape(-1, hidden.shape[-1]) if needs_weight else None
            grad_a = torch.autograd.grad(hidden, a, grad @ weight)[0] if needs_a else None
            return grad_a, None, grad_weight, grad_bias
        # GELU: one (tokens, hidden) buffer serves the recomputed activation, then the hidden gradient; a's gradient
        # is a second one. The generic path makes three. At ViT-S width each is 39 MB, above malloc's mmap threshold,
        # so every one of them is a fresh mapping faulted in page by page (see CPU_CHUNK_BYTES). a's gradient is not
        # written into the buffer it is computed from: aten's CPU gelu_backward ran 1.6x as long with its output on
        # its gradient input (8.9 against 5.5 ms at CNT-S's (32, 197, 1536), after the GEMM that writes that input;
        # in one-image chunks through a small scratch tensor 11.4 ms), and CNT-S's training step 1.013x as fast
        # without it, with glibc's malloc as it is and told to keep its memory (scratch A/Bs, 8 rounds each).
        buffer = F.gelu(a, approximate=approximate)
        grad_weight = rows.t() @ buffer.reshape(-1, buffer.shape[-1]) if needs_weight else None
        if not needs_a:
            return None, None, grad_weight, grad_bias
        grad_hidden = torch.matmul(grad, weight, out=buffer)
        grad_a = torch.ops.aten.gelu_backward(grad_hidden, a, approximate=approximate)
        return grad_a, None, grad_weight, grad_bias


class ActRecomputingMlp(Mlp):
    """ timm's Mlp (same parameters, same function) whose training step does not keep the activation's output.

    Plain, backward holds both fc1's output (for the activation's gradient) and the activation's (for fc2's weight
    gradient): two (tokens, hidden) tensors, the largest a ViT block keeps (hidden = 4x width). Here fc2 keeps fc1's
    output only and backward recomputes the activation from it, one elementwise pass. In a ViT-S block at batch 32
    that is 39 MB less per block (465 MB for 12 blocks), for one GELU (~1% of a CPU training step). With torch's GELU
    the backward makes two (tokens, hidden) tensors, not autograd's three (`_ActThenLinear.backward`).

    `recompute_act` (RECOMPUTE_SETTINGS): 'cpu' (default) for eager CPU tensors only, where kept activations also
    cost page faults (see CPU_CHUNK_BYTES); True / False everywhere. The plain Mlp runs where the recompute does not
    apply: in eval or without grad, under tracers, torch.compile (inductor plans its own recomputation), TorchScript
    and autocast, and for a dropout between the activation and fc2, a hidden norm, conv fcs or an in-place
    activation or one with parameters. Without grad (eval under `no_grad` / `inference_mode`), eager, torch's GELU
    overwrites fc1's output instead (`_forward_act_in_place`): the same outputs from one (tokens, hidden) tensor.
    """

    def __init__(self, *args, recompute_act: Union[bool, str] = 'cpu', **kwargs):
        super().__init__(*args, **kwargs)
        self.recompute_act = check_recompute_setting('recompute_act', recompute_act)
        self.recompute_applies = (
            isinstance(self.fc2, nn.Linear) and isinstance(self.norm, nn.Identity) and self.drop1.p == 0.
            and not getattr(self.act, 'inplace', False) and not any(True for _ in self.act.parameters()))

    @torch.jit.unused
    def _recomputes(self, x: torch.Tensor) -> bool:
        if not (self.recompute_applies and recomputes(self.recompute_act, self.training, x)):
            return False
        return not (torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type))

    @torch.jit.unused
    def _forward_recomputing(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(_ActThenLinear.apply(self.fc1(x), self.act, self.fc2.weight, self.fc2.bias))

    @torch.jit.unused
    def _act_in_place(self) -> bool:
        """ Whether the GELU may overwrite fc1's output: without grad (no backward needs it), eager only. """
        return not (torch.is_grad_enabled() or _gelu_approximation(self.act) is None or traced_or_compiling())

    @torch.jit.unused
    def _forward_act_in_place(self, x: torch.Tensor) -> torch.Tensor:
        # one (tokens, hidden) tensor a block instead of two. On CPU that is more than the memory: glibc's malloc
        # hands back to the OS the top of a heap that two such free tensors leave, and the next block faults it in
        # again page by page (CNT-Ti's eval forward at batch 32: 112 thousand minor faults, 460 -> 325 ms; scratch)
        hidden = torch._C._nn.gelu_(self.fc1(x), approximate=self.act.approximate)
        return self.drop2(self.fc2(self.norm(self.drop1(hidden))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self._recomputes(x):
                return self._forward_recomputing(x)
            if self._act_in_place():
                return self._forward_act_in_place(x)
        # Mlp's forward, written out: TorchScript does not compile super() calls
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


def prune_sequence(model: nn.Module, attr: str, indices: Union[int, List[int]], prune_head: bool) -> List[int]:
    """ Keeps the blocks / stages `model.<attr>` up to the last of `indices`; drops the head if asked. """
    take_indices, max_index = feature_take_indices(len(getattr(model, attr)), indices)
    setattr(model, attr, getattr(model, attr)[:max_index + 1])
    if prune_head:
        model.reset_classifier(0, '')
    return take_indices


def patch_grid(
        img_size: Union[int, Tuple[int, int]],
        patch_size: Tuple[int, int],
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """ (img_size, patch grid) of a patch embedding, or a ValueError where img_size is no positive multiple of the
    patch. """
    img_size = to_2tuple(img_size)
    if any(i % p for i, p in zip(img_size, patch_size)) or min(img_size) < max(patch_size):
        raise ValueError(f'img_size {tuple(img_size)} must be a (non-zero) multiple of patch_size {patch_size}.')
    return tuple(img_size), (img_size[0] // patch_size[0], img_size[1] // patch_size[1])


# glibc's malloc serves a block above 32 MiB (its largest mmap threshold) by a fresh mmap, so every page of such a
# tensor is faulted in and zeroed by the kernel each time one is made; smaller blocks come from malloc's heap and are
# reused. On this CPU (batch 32, 1 thread, system vs user time) the faulting was 37% of TransCNN-S's and 51% of
# Refiner-S's inference time; in chunks of 4 images, 1% and 18%. Chunks are sized to keep each activation below this.
CPU_CHUNK_BYTES = 24 * 2 ** 20


# Training BatchNorm passes over an input whose BatchNorm channels (dim 1) are `groups` repeats of C channels: CNT's
# pixel rows (R, h*w*C), pixel-major and channel-minor (h*w groups), a channels-last map's (B*H, W*C) rows (W groups),
# an NCHW batch's (1, B*C, H*W) view (B groups: statistics per image). Each helper is one of aten's BatchNorm kernels
# over that input, with the per-channel values repeated for each group (`per_group`). On CPU, aten vectorizes along
# dim 1 of a 2D input, so on such rows every pass runs along whole rows; on the (R*groups, C) pixels or the
# channels-last map itself it vectorizes along C, and a C that fills no whole vector (CNT-Ti's 8, a refiner's 36) leaves
# lanes idle. A caller that runs a pass over several chunks repeats the per-channel values once, for its largest
# `groups`: a smaller count's values are a prefix of them (`group_prefix`).

def _repeat_per_group(vector: torch.Tensor, groups: int) -> torch.Tensor:
    # contiguous, not reshape: of one channel's (groups, 1) expand, reshape makes a stride-0 view, which aten's
    # BatchNorm kernels read as if it were dense
    return vector.expand(groups, vector.shape[0]).contiguous().view(-1)


# torch >= 2.5: custom_op (2.4), and is_exporting to keep the operator out of exported programs (torch.export and the
# ONNX exporter run under is_compiling too; their programs must hold only operators other runtimes know)
if hasattr(torch.library, 'custom_op') and hasattr(torch.compiler, 'is_exporting'):
    @torch.library.custom_op('timm_hybrid::repeat_per_group', mutates_args=())
    def repeat_per_group(vector: torch.Tensor, groups: int) -> torch.Tensor:
        """ `per_group` of one vector for groups > 1 (one group would alias the input), as an operator that
        torch.compile does not trace into (see `per_group`). """
        return _repeat_per_group(vector, groups)

    @repeat_per_group.register_fake
    def _repeat_per_group_fake(vector: torch.Tensor, groups: int) -> torch.Tensor:
        return vector.new_empty(groups * vector.shape[0])

    def _repeat_per_group_context(ctx, inputs: Tuple[torch.Tensor, int], output: torch.Tensor) -> None:
        ctx.groups = inputs[1]

    def _repeat_per_group_backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return grad.view(ctx.groups, -1).sum(0), None

    repeat_per_group.register_autograd(_repeat_per_group_backward, setup_context=_repeat_per_group_context)
else:
    repeat_per_group = None


def per_group(groups: int, *vectors: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """ Per-channel (C,) vectors as (groups * C,): each channel's value once in every group, channel-minor. The
    vectors themselves for one group, else an expand and one copy each: `Tensor.repeat` dispatches several ops on CPU
    (5.6 against 2.5 us for 8 values, scratch); Refiner-S's training step made 7432 repeats, 1.7% of its time.

    Compiled for the CPU (not exported), the copy is an operator inductor does not trace into (`repeat_per_group`):
    traced, inductor fuses the expand into the kernel that reads the vectors, as a gather with a modulo index inside its
    row loop that its C++ code cannot vectorize, so every pass over CNT-Ti's pixel rows (its row BatchNorms) ran as
    scalar code, 1.0-2.8 ms a call. As a buffer, the vectors are read like the rows: inductor's own kernels in CNT-Ti's
    compiled training step took 161-180 against 238-256 ms (with `grouped_norm`'s affine for rows; scratch, three
    processes each, 2 threads, batch 32), and the step went from 0.819x to 0.892x DeiT-Ti's (README, pair runs). """
    if groups == 1:
        return list(vectors)
    if repeat_per_group is not None and torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return [None if v is None else repeat_per_group(v, groups) if v.device.type == 'cpu'
                else _repeat_per_group(v, groups) for v in vectors]
    return [None if v is None else _repeat_per_group(v, groups) for v in vectors]


def group_prefix(x: torch.Tensor, *repeated: torch.Tensor) -> List[torch.Tensor]:
    """ `per_group` vectors made for at least x's groups, cut to x's dim 1 (its groups times C): views. """
    return [v[:x.shape[1]] for v in repeated]


def grouped_norm_stats(x: torch.Tensor, groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """ Mean and biased variance of each of x's `groups` * C channels, as (groups, C): aten's BatchNorm statistics
    kernel, one pass. Compiled, `var_mean` over the same dims: aten's kernel has no fake (meta) implementation, so
    dynamo could trace it only with static shapes, and a compiled CNT-Ti failed at its second batch size (automatic
    dynamic shapes); inductor makes either one reduction pass. """
    if torch.compiler.is_compiling():
        var, mean = torch.var_mean(x, dim=[0] + list(range(2, x.ndim)), correction=0)
    else:
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.)
    return mean.view(groups, -1), var.view(groups, -1)


def merge_group_stats(
        means: Sequence[torch.Tensor],
        variances: Sequence[torch.Tensor],
        counts: Sequence[int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ Per-channel (C,) mean and biased variance of several inputs from each one's (G_i, C) statistics per group and
    channel over `counts[i]` values each: the exact merge (Chan et al.), in float64 (a sum of squares minus the squared
    sum would cancel where values sit near their mean: attention maps near 1/N at init). """
    mean = torch.cat(means).double()
    var = torch.cat(variances).double()
    n = sum(m.shape[0] * k for m, k in zip(means, counts))
    if len(set(counts)) == 1:
        weights = counts[0] / n  # each group's share of the values
    else:  # made on the statistics' device: a tensor from host values would be a copy that waits for the device
        weights = torch.cat([mean.new_full((m.shape[0], 1), k / n) for m, k in zip(means, counts)])
    merged_mean = (mean * weights).sum(0)
    return merged_mean, ((var + (mean - merged_mean) ** 2) * weights).sum(0)


def norm_scale_shift(
        mean: torch.Tensor,
        var: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ Per-channel scale and shift of a norm by (mean, var) with an optional affine: x * scale + shift. """
    scale = torch.rsqrt(var + eps) if weight is None else weight * torch.rsqrt(var + eps)
    shift = -mean * scale if bias is None else bias - mean * scale
    return scale, shift


def grouped_norm(
        x: torch.Tensor,
        mean: torch.Tensor,
        var: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        eps: float,
        groups: int,
) -> torch.Tensor:
    """ `x` normalised by per-channel (C,) statistics and affine: one pass. Rows (2D) as x * scale + shift with the
    per-channel scale and shift computed once (aten's inference BatchNorm took 0.129 against 0.066 ms on CNT-Ti's
    (6272, 16 x 8) pixel rows, and inductor's decomposition of it takes a square root and a division a value); other
    inputs through aten's inference kernel (on NCHW maps 1.1-1.3 against 1.4-1.5 ms for the affine). """
    if x.ndim == 2:
        scale, shift = per_group(groups, *norm_scale_shift(mean, var, weight, bias, eps))
        return torch.addcmul(shift, x, scale)
    return F.batch_norm(x, *per_group(groups, mean, var, weight, bias), False, 0., eps)


def grouped_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """ x * scale + shift along dim 1, `scale` and `shift` repeated for x's groups, written into `out`: one pass (a
    norm's output in a fresh tensor that an autograd Function then returns as a view of it, since a Function's output
    may not be a view if in-place ops are to follow). """
    shape = (-1,) + (1,) * (x.ndim - 2)  # along dim 1
    return torch.addcmul(shift.view(shape), x, scale.view(shape), out=out)


def grouped_norm_grad_sums(
        grad: torch.Tensor,
        x: torch.Tensor,
        mean: torch.Tensor,
        var: torch.Tensor,
        inv_std: torch.Tensor,
        eps: float,
        groups: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ Per-channel (C,) sum(grad * x_hat) and sum(grad) of `x` normalised by (mean, var), given repeated for x's
    `groups` (with inv_std = rsqrt(var + eps)): what aten's inference-mode BatchNorm backward reduces for the weight and
    bias gradients, one pass over `grad` and `x`. The statistics go in as running (read on CPU) and as saved ones (read
    on CUDA). The sums do not depend on the norm's weight, but a weight goes in: aten's CUDA kernel allocates the
    weight gradient with the weight's options. """
    sum_grad_x, sum_grad = torch.ops.aten.native_batch_norm_backward(
        grad, x, torch.ones_like(mean), mean, var, mean, inv_std, False, eps, [False, True, True])[1:]
    return sum_grad_x.view(groups, -1).sum(0), sum_grad.view(groups, -1).sum(0)


def grouped_norm_input_grad(
        grad: torch.Tensor,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        c: torch.Tensor,
) -> torch.Tensor:
    """ a * grad + b * x + c with a, b, c repeated for x's groups: a training BatchNorm's input gradient, two
    passes. """
    shape = (-1,) + (1,) * (x.ndim - 2)  # along dim 1
    return torch.addcmul(c.view(shape), x, b.view(shape)).addcmul_(grad, a.view(shape))


def update_running_stats(norm: nn.Module, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """ A training BatchNorm's running-stat update from a batch's mean and biased variance over `n` values, as
    nn.BatchNorm2d makes it: momentum, or a cumulative mean where momentum is None; the variance unbiased. """
    if norm.track_running_stats and norm.running_mean is not None:
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            momentum = 1. / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
            norm.running_mean.lerp_(mean.detach(), momentum)
            norm.running_var.lerp_(var.detach() * (n / max(n - 1, 1)), momentum)


def batch_norm_grad_coefficients(
        weight: torch.Tensor,
        mean: torch.Tensor,
        inv_std: torch.Tensor,
        sum_grad_x: torch.Tensor,
        sum_grad: torch.Tensor,
        count: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ Per-channel a, b, c of a training BatchNorm's input gradient a * g + b * x + c, which is
    weight * inv_std * (g - mean(g) - x_hat * mean(g * x_hat)), from the sums of g * x_hat and g over `count`
    values. """
    a = weight * inv_std
    b = -a * inv_std * sum_grad_x / count
    c = -a * sum_grad / count - b * mean
    return a, b, c


@torch.jit.unused
def cpu_untraced(x: torch.Tensor) -> bool:
    """ Whether `x` is a CPU tensor that no fx / jit tracer records (eager or under torch.compile): the case for CPU
    kernel choices that inductor also gains from. """
    if is_fx_symbolic_tracing() or torch.jit.is_tracing():
        return False  # before reading x: a traced x's device steers no Python branch
    return x.device.type == 'cpu'


@torch.jit.unused
def eager_on_cpu(x: torch.Tensor) -> bool:
    """ Whether `x` runs eagerly on the CPU: not on an accelerator, not under fx / jit tracing or torch.compile
    (tracers and compilers plan memory and layouts themselves), the case CPU-only layout and chunking choices are
    measured for. """
    return not torch.compiler.is_compiling() and cpu_untraced(x)


@torch.jit.unused
def cpu_chunk_size(x: torch.Tensor, setting: Optional[int], per_sample_bytes: Callable[[], int]) -> int:
    """ How many images of the batch `x` a large-activation computation on CPU should run at a time; 0: whole.

    `setting` is the model's `cpu_chunk`: None sizes the chunk from `per_sample_bytes()` (the largest activation of
    one image, asked only when needed: tracers cannot read shapes) and CPU_CHUNK_BYTES, 0 never chunks, n chunks by
    n. Accelerators (caching allocators; small kernels cost launches there) and tracers / compilers (they plan memory
    themselves) run the batch whole. """
    if setting == 0 or not eager_on_cpu(x) or x.shape[0] < 2:  # one image (or none) is no batch to cut
        return 0
    chunk = setting if setting is not None else max(1, CPU_CHUNK_BYTES // max(1, per_sample_bytes()))
    return chunk if x.shape[0] > chunk else 0


def check_image_batch(x: torch.Tensor, in_chans: int) -> None:
    """ AssertionErrors (as timm's own input checks) for a batch that is no (B, in_chans, H, W) image batch. """
    _assert(x.ndim == 4, f'Expected a 4D image batch (B, C, H, W), got a {x.ndim}D tensor.')
    _assert(x.shape[1] == in_chans, f'Input has {x.shape[1]} channels, the model was built for in_chans={in_chans}.')


@register_notrace_function  # branches on the input size
def size_mismatch_message(height: int, width: int, img_size: Tuple[int, int], patch_size: Tuple[int, int]) -> str:
    """ The error for an input of another size than the model's; it suggests img_size=(H, W) only where a model can
    be built for that size (each side a positive multiple of the patch). """
    message = f'Input image size ({height}x{width}) does not match the model ({img_size[0]}x{img_size[1]}); '
    if height > 0 and width > 0 and height % patch_size[0] == 0 and width % patch_size[1] == 0:
        return message + f'create the model with img_size=({height}, {width}) for this size.'
    return message + (f'resize the images to it ({height}x{width} is no model size: each side must be a positive '
                      f'multiple of patch_size {patch_size}).')


class PatchGridEmbed(nn.Module):
    """ Base of the class-token families' input embeddings (CNT's pixel embedding, Refiner-ViT's conv stem): the
    patch grid of the fixed input size, timm's PatchEmbed size API, and the input checks. """

    def __init__(self, img_size: Union[int, Tuple[int, int]], patch_size: Union[int, Tuple[int, int]], in_chans: int):
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        self.set_input_size(img_size)

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        self.img_size, self.grid_size = patch_grid(img_size, self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True) -> Union[Tuple[int, int], int]:
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def check_input(self, x: torch.Tensor) -> None:
        check_image_batch(x, self.in_chans)
        H, W = x.shape[2], x.shape[3]
        # two asserts, not one with `and`: FX cannot branch on a traced comparison
        size_msg = size_mismatch_message(H, W, self.img_size, self.patch_size)
        _assert(H == self.img_size[0], size_msg)
        _assert(W == self.img_size[1], size_msg)


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


def bn_scale_shift(
        bn: nn.Module,
        conv_bias: Optional[torch.Tensor],
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """ Per-channel (scale, shift) of an inference-mode BatchNorm after a conv with `conv_bias`; (None, bias) when
    the norm has been folded away already (Identity, after `reparameterize()`). """
    if isinstance(bn, nn.Identity):
        return None, conv_bias
    # (conv + conv_bias - mean) * scale + bias: the conv's bias moves the mean
    mean = bn.running_mean if conv_bias is None else bn.running_mean - conv_bias
    return norm_scale_shift(mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def has_running_stats(norm: nn.Module) -> bool:
    """ Whether `norm` is a BatchNorm with running statistics: in eval, a per-channel affine. """
    return (isinstance(norm, nn.modules.batchnorm._BatchNorm)
            and norm.running_mean is not None and norm.running_var is not None)


def folds_into_conv(norm: nn.Module) -> bool:
    """ Whether `norm` is an inference-mode BatchNorm with running statistics: a per-channel affine that can fold into
    a neighbouring conv (a training norm, GroupNorm or a norm without running statistics cannot). """
    return has_running_stats(norm) and not norm.training


def _folds(norm: nn.Module, conv: nn.Module) -> bool:
    # An inference BatchNorm next to torch's Conv2d with static zero padding (not timm's Conv2dSame, no padding
    # mode), outside jit tracing: a jit-traced graph (fvcore's FLOP count, ONNX export) keeps the modules as the
    # model defines them. An fx graph folds as eager does: timm asks fx logits equal to eager's to the bit.
    return (folds_into_conv(norm) and type(conv) is nn.Conv2d and conv.padding_mode == 'zeros'
            and not isinstance(conv.padding, str) and not torch.jit.is_tracing())


def conv_norm_weights(conv: nn.Module, norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """ (weight, bias) of one conv that computes norm(conv(x)) for an inference BatchNorm `norm`. """
    scale, shift = bn_scale_shift(norm, conv.bias)
    return conv.weight * scale.reshape(-1, 1, 1, 1), shift


def norm_conv1x1_weights(norm: nn.Module, conv: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """ (weight, bias) of one 1x1 conv that computes conv(norm(x)) for an inference BatchNorm `norm` (no padding: the
    norm's affine of every input pixel reaches the conv as is). """
    scale, shift = bn_scale_shift(norm, None)
    bias = conv.weight.flatten(1) @ shift
    return conv.weight * scale.reshape(1, -1, 1, 1), bias if conv.bias is None else bias + conv.bias


def conv2d_with(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """ A new Conv2d with `conv`'s geometry, device and dtype, holding `weight` and `bias` (a folded norm's). """
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
        bias=True, padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return fused


def fold_conv_norm(conv: nn.Module, norm: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """ (conv, norm) with a BatchNorm with running statistics folded into torch's Conv2d before it (eval semantics):
    the fused conv and what stays of the norm (norm_act_remainder); anything else (a norm folded already, GroupNorm)
    comes back as it is. """
    if not (has_running_stats(norm) and type(conv) is nn.Conv2d):
        return conv, norm
    return conv2d_with(conv, *conv_norm_weights(conv, norm)), norm_act_remainder(norm)


def norm_act_remainder(norm: nn.Module) -> nn.Module:
    """ What stays of a norm folded into a conv: the act of timm's norm + act layers (their dropout is a no-op in
    eval), else nothing. """
    act = getattr(norm, 'act', None)
    return nn.Identity() if act is None else act


@torch.jit.unused
def conv_norm_eval(x: torch.Tensor, conv: nn.Module, norm: nn.Module) -> torch.Tensor:
    """ norm(conv(x)), folding an inference BatchNorm into the conv's weight and bias where it can: one pass over the
    output instead of two (then the norm's dropout and act where it is one of timm's norm + act layers). Same outputs
    within fp32 rounding; otherwise, in training and under jit tracing, the modules as they are. """
    if not _folds(norm, conv):
        return norm(conv(x))
    weight, bias = conv_norm_weights(conv, norm)
    x = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if hasattr(norm, 'act'):  # timm's norm + act layers (BatchNormAct2d, SyncBatchNormAct after timm's converter)
        x = norm.act(norm.drop(x))
    return x


@torch.jit.unused
def conv_norm_acts_eval(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    """ timm's ConvNormAct `layers` one after another, each norm folded into its conv as conv_norm_eval does (a layer
    with an anti-aliasing pool runs as it is). """
    for layer in layers:
        x = layer(x) if getattr(layer, 'aa', None) is not None else conv_norm_eval(x, layer.conv, layer.bn)
    return x


def norm_folds_into_conv1x1(norm: nn.Module, conv: nn.Module) -> bool:
    """ Whether `norm`, a BatchNorm with running statistics before `conv`, folds into it: nothing runs after the norm's
    affine (timm's norm + act layers run their act there), and `conv` is torch's 1x1 Conv2d without padding or groups,
    so every input pixel's affine reaches it as it is. """
    return (has_running_stats(norm) and not hasattr(norm, 'act') and type(conv) is nn.Conv2d
            and conv.kernel_size == (1, 1) and conv.padding == (0, 0) and conv.groups == 1)


def _folds_before_conv1x1(norm: nn.Module, conv: nn.Module) -> bool:
    return _folds(norm, conv) and norm_folds_into_conv1x1(norm, conv)


@torch.jit.unused
def norm_conv1x1_eval(x: torch.Tensor, norm: nn.Module, conv: nn.Module) -> torch.Tensor:
    """ conv(norm(x)) for a 1x1 conv, folding an inference BatchNorm into the conv's weight and bias where it can, as
    conv_norm_eval does. """
    if not _folds_before_conv1x1(norm, conv):
        return conv(norm(x))
    weight, bias = norm_conv1x1_weights(norm, conv)
    return F.conv2d(x, weight, bias, conv.stride)


GLOBAL_POOL_TYPES = ('', 'token', 'avg')


def check_global_pool(global_pool: str) -> str:
    """ The pooling of a class-token model: 'token' (class token), 'avg' (mean of the patch tokens) or '' (none). """
    if global_pool not in GLOBAL_POOL_TYPES:
        raise ValueError(f"Unknown global_pool '{global_pool}', expected one of {GLOBAL_POOL_TYPES}.")
    return global_pool


class TokenClassifierMixin:
    """ timm's model API for a class-token model (CNT, Refiner-ViT): the block loop, `forward_features`,
    `forward_intermediates`, pooling and the classifier methods.

    The model provides `blocks`, `norm`, `head`, `head_drop`, `cls_token`, `embed_dim`, `global_pool`, `num_classes`,
    `num_prefix_tokens`, `grad_checkpointing`, and four methods: `_embed(image) -> (tokens, state)`, where `state` is
    what each block hands to the next besides the tokens (CNT: the pixel grids; Refiner: the attention map, None
    before the first block), every block being `(tokens, state) -> (tokens, state)`; `_token_grid()`, the
    (rows, cols) of the patch tokens; `_input_embed()`, the patch embedding (`img_size`, `patch_size`, `grid_size`,
    `num_patches`, `set_input_size(img_size)`); `_resample_pos_embed(old_grid)`, which puts the position embedding
    on the current grid. It registers the `token_grid` buffer with `_register_token_grid()`.

    The contract the families share (tests/test_reliability.py holds each to it):
    * Inputs: a float (B, in_chans, H, W) batch at the img_size the model was built for. A wrong rank, channel
      count or size raises an AssertionError naming what was expected; an empty batch (B = 0) gives
      (0, num_classes) logits in eval and training. NaN / inf are not checked (a full reduction and host sync per
      forward, and a data-dependent branch torch.export / ONNX cannot take): in eval they reach only their own
      sample's logits; in training, batch statistics may spread them (the families say where).
    * Export: torch.jit.script, FX, torch.export (dynamic batch), torch.compile(fullgraph=True) and ONNX (dynamo
      exporter, run in onnxruntime) all match eager within 1e-4.
    """

    # the stem parameters for `group_matcher` (layer-wise LR decay, timm's optimiser factory), set by the model
    group_stem: str = ''

    def _init_token_model(
            self,
            num_classes: int,
            in_chans: int,
            global_pool: str,
            embed_dim: int,
            num_prefix_tokens: int,
    ) -> None:
        """ The attributes timm's API reads, set alike by every token model. """
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = check_global_pool(global_pool)
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = num_prefix_tokens
        self.grad_checkpointing = False

    def _init_head(
            self,
            norm_layer: Callable[..., nn.Module],
            drop_rate: float,
            reduction: int,
            device=None,
            dtype=None,
    ) -> None:
        """ Final norm, head dropout and linear head, and `feature_info` for the blocks (after `blocks` exist). """
        self.feature_info = [
            dict(module=f'blocks.{i}', num_chs=self.embed_dim, reduction=reduction) for i in range(len(self.blocks))]
        self.norm = norm_layer(self.embed_dim, device=device, dtype=dtype)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(self.num_classes, device=device, dtype=dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=self.group_stem, blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    def _run_blocks(self, x: torch.Tensor, take_indices: List[int], max_index: int, norm: bool, stop_early: bool):
        """ Image -> (final tokens, tokens after the blocks in take_indices). """
        intermediates: List[torch.Tensor] = []
        x, state = self._embed(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, state = checkpoint_keeping_bn_stats(blk, x, state)
            else:
                x, state = blk(x, state)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        return x, intermediates

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """ Forward features that returns intermediates (patch tokens after the selected blocks).

        Args:
            x: Input image tensor.
            indices: Take last n blocks if an int, if a sequence, select by matching indices.
            return_prefix_tokens: Return both prefix and spatial intermediate tokens.
            norm: Apply the final norm layer to all intermediates.
            stop_early: Stop iterating over blocks when the last desired intermediate is reached.
            output_fmt: Shape of intermediate feature outputs, 'NCHW' or 'NLC'.
            intermediates_only: Only return intermediate features.
        """
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, intermediates = self._run_blocks(x, take_indices, max_index, norm, stop_early)
        intermediates, prefix_tokens = split_prefix_tokens(
            intermediates, self.num_prefix_tokens, self._token_grid(), output_fmt == 'NCHW')
        if not torch.jit.is_scripting() and return_prefix_tokens:
            # return_prefix not supported in torchscript due to poor type handling
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            chunk = 0 if self.training else cpu_chunk_size(
                x, self._cpu_chunk_setting(), self._per_sample_activation_bytes)
            if chunk:  # eval on CPU: every image is on its own, and chunk-sized activations reuse malloc's heap
                return torch.cat([self._forward_features(part) for part in x.split(chunk)])
        return self._forward_features(x)

    def _forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self._run_blocks(x, [], len(self.blocks) - 1, False, False)
        return self.norm(x)

    @torch.jit.unused
    def _cpu_chunk_setting(self) -> Optional[int]:
        return getattr(self, 'cpu_chunk', 0)  # a family without large activations leaves it unset: never

    @torch.jit.unused
    def _per_sample_activation_bytes(self) -> int:
        return 0

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """ Tokens (B, prefix + N, D) -> (B, D) by `global_pool`, then the head dropout. """
        if self.global_pool:
            x = x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == 'avg' else x[:, 0]
        return self.head_drop(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        self.head = self._new_head(num_classes)

    def _new_head(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        """ A fresh linear head (nn.Identity for num_classes=0) in the model's train / eval mode, on `device` /
        `dtype` or else the model's, as timm's own models reset theirs. """
        if num_classes <= 0:
            return nn.Identity().train(self.training)
        head = nn.Linear(
            self.embed_dim, num_classes, device=device or self.cls_token.device, dtype=dtype or self.cls_token.dtype)
        return head.train(self.training)

    def _register_token_grid(self, device=None) -> None:
        """ Stores the (rows, cols) of the patch tokens in the state dict, so that a checkpoint says which grid its
        position embedding was trained on (a token count does not: 16 tokens are 4x4 or 2x8). """
        self.register_buffer('token_grid', torch.tensor(self._token_grid(), dtype=torch.long, device=device))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + 'token_grid'
        stored = state_dict.get(key)
        if stored is None:
            # written before the grid was stored: either the model's grid, or the position embedding's shape fails
            state_dict[key] = self.token_grid
        elif stored.device.type != 'meta' and tuple(stored.tolist()) != tuple(self._token_grid()):
            error_msgs.append(
                f'the checkpoint was trained on a {"x".join(map(str, stored.tolist()))} token grid, the model has '
                f'{"x".join(map(str, self._token_grid()))}; load it through timm.create_model(..., pretrained=True) '
                f'or the family\'s checkpoint_filter_fn, which resample the position embedding.')
            state_dict[key] = self.token_grid
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @torch.jit.ignore
    def set_input_size(self, img_size: Union[int, Tuple[int, int]], patch_size: Optional[Any] = None) -> None:
        """ timm's API for another input resolution (as its ViT's): the patch grid, the position embedding resampled
        to it from the current grid (a learned one; a sin-cos one is rebuilt), the stored `token_grid` and the
        model's input traits. The patch size stays (the pixel / stem convolutions are built for it). """
        if patch_size is not None and to_2tuple(patch_size) != tuple(self._input_embed().patch_size):
            raise ValueError(f'set_input_size cannot change patch_size {self._input_embed().patch_size}.')
        embed = self._input_embed()
        old_grid = embed.grid_size
        embed.set_input_size(img_size)
        self.num_patches = embed.num_patches
        self._resample_pos_embed(old_grid)
        self.token_grid = torch.tensor(embed.grid_size, dtype=torch.long, device=self.token_grid.device)
        update_model_input_size(self, embed.img_size)

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


# --- official weights ------------------------------------------------------------------------------------------------

class PretrainedWeightsUnavailable(RuntimeError):
    """ A tag's weights could not be loaded: no network, a file that moved, or a drive timm cannot download. """


def official_weights_cache_file(pretrained_cfg: Mapping[str, Any]) -> Optional[Path]:
    """ Where timm's url download keeps a tag's official file (torch.hub's checkpoints folder, file name of the url):
    a file put there by hand loads offline as if downloaded. None for a tag without a url. """
    url = pretrained_cfg.get('url')
    if not url:
        return None
    return Path(torch.hub.get_dir()) / 'checkpoints' / os.path.basename(urlparse(url).path)


def weights_source_hint(pretrained_cfg: Mapping[str, Any], error: Optional[BaseException] = None) -> str:
    """ Where a tag's weights come from and how to load them without network, for an error message. """
    name = pretrained_cfg.get('architecture', 'the model')
    if pretrained_cfg.get('tag'):
        name = f"{name}.{pretrained_cfg['tag']}"
    url, file, hub_id = (pretrained_cfg.get(k) for k in ('url', 'file', 'hf_hub_id'))
    origin = pretrained_cfg.get('origin_url')
    if file:
        problem = 'does not exist' if not Path(file).is_file() else 'could not be read'
        first = f'{name}: the weights file {file} (the pretrained cfg\'s file) {problem}'
    elif hub_id:  # timm's order: file, then the hub, then the url
        first = f'{name}: the weights come from the Hugging Face Hub repo {hub_id}, which could not be reached'
    elif url:
        first = f'{name}: the weights are the official release file {url}, which could not be downloaded'
    else:  # timm's own error would say "No pretrained weights exist", which is not so
        first, error = f'{name}: the official weights have no address timm can download from', None
    message = str(error).strip().splitlines()[0] if error is not None and str(error).strip() else ''
    lines = [f'{first}{f" ({type(error).__name__}: {message})" if message else ""}.']
    if origin:
        lines.append(f'Official release: {origin} (the model\'s checkpoint_filter_fn converts the official file on '
                     f'load).')
    example = os.path.basename(urlparse(url).path) if url else 'checkpoint.pth'
    lines.append(f"Offline: download the file on a machine with network, then timm.create_model('{name}', "
                 f"pretrained=True, pretrained_cfg_overlay=dict(file='PATH/TO/{example}'))")
    cached = official_weights_cache_file(pretrained_cfg)
    if cached is not None:
        lines.append(f'or put it at {cached} (timm\'s download cache, read without network).')
    return '\n'.join(lines)


def token_model_cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    """ timm pretrained-cfg defaults of the 224 px class-token families (CNT as TNT, Refiner-ViT as released):
    bicubic resize for a 0.9 crop, Inception mean / std, a fixed input size (learned position embedding). """
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_INCEPTION_MEAN, 'std': IMAGENET_INCEPTION_STD,
        **kwargs,
    }


def build_token_model(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool,
        checkpoint_filter_fn: Callable,
        default_depth: int,
        builder: Callable[..., nn.Module] = build_model_with_cfg,
        **kwargs,
):
    """ `builder` (timm's build_model_with_cfg, or build_with_official_weights) for a class-token model whose
    features_only default is its last 3 blocks (every block of a shallower model, e.g. depth=2). """
    depth = kwargs.get('depth', default_depth)
    out_indices = kwargs.pop('out_indices', min(3, depth) if isinstance(depth, int) and depth > 0 else 3)
    return builder(
        model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)


def build_with_official_weights(model_cls: Callable[..., nn.Module], variant: str, pretrained: bool, **kwargs):
    """ timm's `build_model_with_cfg`, for a family whose tags load official release files: when the weights cannot
    be fetched (no network, a moved or missing file, no downloadable source), the error says where they come from
    and how to load them offline instead of timm's bare download error or "No pretrained weights exist". """
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except (OSError, RuntimeError) as e:  # urllib / huggingface_hub / missing-file errors are all OSErrors
        if not pretrained or not isinstance(e, OSError) and 'No pretrained weights exist' not in str(e):
            raise
        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
            pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        raise PretrainedWeightsUnavailable(weights_source_hint(cfg.to_dict(), e)) from e


# --- constructor arguments -------------------------------------------------------------------------------------------

def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """ `value` as an int >= minimum, or a ValueError that states the valid range. """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
    return int(value)


def check_ints(name: str, values: Any, minimum: int = 1, length: Optional[int] = None) -> Tuple[int, ...]:
    """ An int or a sequence of ints (one per stage / side), each >= minimum. """
    values = tuple(values) if isinstance(values, (list, tuple)) else (values,) * (length or 1)
    if length is not None and len(values) != length:
        raise ValueError(f'{name} needs {length} values, got {len(values)}: {values!r}.')
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
            raise ValueError(f'{name} must hold integers >= {minimum}, got {values!r}.')
    return tuple(int(v) for v in values)


def check_positive(name: str, value: Any) -> float:
    """ A finite real number > 0 (widths ratios such as mlp_ratio). """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f'{name} must be a number > 0, got {value!r}.')
    return float(value)


def check_rate(name: str, value: Any) -> float:
    """ A dropout / drop-path probability, in [0, 1]. """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0. <= value <= 1.:
        raise ValueError(f'{name} must be a probability in [0, 1], got {value!r}.')
    return float(value)


def check_token_model_args(
        img_size: Any,
        patch_size: Any,
        in_chans: Any,
        num_classes: Any,
        embed_dim: Any,
        depth: Any,
        num_heads: Any,
        mlp_ratio: Any,
        **rates: Any,
) -> None:
    """ The constructor arguments CNT and Refiner-ViT share, each against its valid range (ValueError naming it). """
    check_ints('img_size', img_size, 1, length=2)
    check_ints('patch_size', patch_size, 1, length=2)
    check_int('in_chans', in_chans, 1)
    check_int('num_classes', num_classes, 0)
    check_int('embed_dim', embed_dim, 1)
    check_int('depth', depth, 1)
    check_int('num_heads', num_heads, 1)
    if embed_dim % num_heads:
        raise ValueError(f'embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads}).')
    check_positive('mlp_ratio', mlp_ratio)
    for name, rate in rates.items():
        check_rate(name, rate)


# --- checkpoint layouts ----------------------------------------------------------------------------------------------

# below this share of the model's weights (elements of its floating-point tensors) coming from a checkpoint, a filter
# refuses it: such a "fine-tune" would be a random model with a few borrowed tensors (a DeiT-Ti checkpoint into the
# 64-wide CNT nano fits 1 of 71 tensors)
MIN_LOADED_SHARE = 0.5

# (layout, marker keys' test) in the order they are told apart; the first match names what a checkpoint is
_LAYOUTS = (
    ('CNT', lambda keys: any('.outer.' in k for k in keys)),
    ('timm TNT', lambda keys: any('.attn_out.' in k for k in keys)),
    ('Refiner-ViT', lambda keys: any('.attn.refine.' in k or '.attn.DLA.' in k for k in keys)),
    ('official TransCNN / HAT-Net', lambda keys: any(k.startswith('ds2.') for k in keys)),
    ('TransCNN / HAT-Net', lambda keys: any(k.startswith('stages.') and '.attn.qkv.' in k for k in keys)),
    ('timm ViT / DeiT', lambda keys: 'patch_embed.proj.weight' in keys and any(
        k.startswith('blocks.0.attn.qkv.') for k in keys)),
    ('timm ResNet', lambda keys: any(k.startswith('layer1.') for k in keys)),
)


def describe_layout(state_dict: Mapping[str, Any]) -> str:
    """ The model family a state dict's keys come from, as far as the families here and timm's baselines go. """
    keys = set(state_dict)
    for name, matches in _LAYOUTS:
        if matches(keys):
            return name
    return f'unknown layout (first keys: {sorted(keys)[:6]})'


def check_loaded_share(
        fitting: Mapping[str, torch.Tensor],
        model: nn.Module,
        layout: str,
        not_fitting: Sequence[str] = (),
) -> float:
    """ Raises a ValueError when the tensors of a checkpoint that fit `model` (right name and shape) make up less than
    MIN_LOADED_SHARE of its weights, naming the layout seen and what did not fit; returns the share. """
    model_state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    total = sum(v.numel() for v in model_state.values())
    loaded = sum(v.numel() for k, v in model_state.items() if k in fitting and fitting[k].shape == v.shape)
    share = loaded / max(total, 1)
    if share < MIN_LOADED_SHARE:
        not_fitting = summarize_keys(list(not_fitting))
        raise ValueError(
            f'checkpoint_filter_fn: a {layout} checkpoint, of which {100 * share:.1f}% of '
            f'{type(model).__name__}\'s weights would load ({loaded:,} of {total:,} values; at least '
            f'{100 * MIN_LOADED_SHARE:.0f}% needed). Did not fit: {", ".join(not_fitting[:8]) or "nothing named"}'
            f'{f", ... ({len(not_fitting) - 8} more)" if len(not_fitting) > 8 else ""}. Load it into the model it '
            f'was trained as (same name and model kwargs).')
    return share


# --- position embeddings from the checkpoint's real grid -------------------------------------------------------------

def source_token_grid(
        state_dict: Mapping[str, Any],
        model: nn.Module,
        num_tokens: int,
        patch_size: Union[int, Tuple[int, int]],
) -> Tuple[int, int]:
    """ The (rows, cols) grid of the `num_tokens` patch tokens a checkpoint's position embedding was trained on.

    In order: the `token_grid` the checkpoint stores (every CNT / Refiner-ViT state dict written since it exists);
    the size timm's loaders say the weights were made at (`pretrained_model_args['img_size']` of a hub / local-dir
    folder's config.json, else the pretrained cfg's `input_size`) when its grid holds exactly `num_tokens`; a square
    grid when `num_tokens` is a square (timm's assumption). Otherwise a ValueError: a non-square grid cannot be read
    off a token count (16 tokens are 4x4 or 2x8).
    """
    grid = state_dict.get('token_grid')
    if isinstance(grid, torch.Tensor) and grid.numel() == 2:
        rows, cols = (int(g) for g in grid.tolist())
        if rows * cols != num_tokens:
            raise ValueError(f'checkpoint_filter_fn: the checkpoint stores a {rows}x{cols} token grid but its '
                             f'position embedding has {num_tokens} patch tokens.')
        return rows, cols
    patch_size = to_2tuple(patch_size)
    size = getattr(model, 'pretrained_model_args', {}).get('img_size') or (
        getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (0, 0, 0))[-2:]
    rows, cols = (s // p for s, p in zip(to_2tuple(size), patch_size))
    if rows * cols == num_tokens:
        return rows, cols
    side = math.isqrt(num_tokens)
    if side * side == num_tokens:
        return side, side
    raise ValueError(
        f'checkpoint_filter_fn: the position embedding has {num_tokens} patch tokens, not a square grid, and the '
        f'checkpoint does not store its grid; give the size it was trained at, e.g. '
        f'pretrained_cfg_overlay=dict(file=..., input_size=(C, H, W)).')


def resample_token_pos(
        pos: torch.Tensor,
        source_grid: Tuple[int, int],
        target_grid: Tuple[int, int],
        num_prefix_tokens: int,
) -> torch.Tensor:
    """ A position embedding (1, prefix + rows * cols, D) resampled from `source_grid` to `target_grid`. """
    if tuple(source_grid) == tuple(target_grid):
        return pos
    return resample_abs_pos_embed(
        pos, new_size=list(target_grid), old_size=list(source_grid), num_prefix_tokens=num_prefix_tokens)
