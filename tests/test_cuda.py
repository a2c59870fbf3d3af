""" The paths the families take on CUDA only, held to the CPU's numbers. They skip without a GPU; on a lent GPU
machine benchmarks/device_run.sh runs them (`pytest -k cuda`) before it times anything.

On CUDA, CNT's inner block runs as GEMMs with aten's BatchNorm on the grid view (`inner_impl='auto'`), Refiner's
refinement on channels-last maps with per-image BatchNorm statistics, TransCNN's and HAT-Net's maps channels-last
with HAT-Net's norms as layer norms over them; a CPU step takes other paths (row BatchNorms, the convolution form,
the chunked refiner). In float32 without TF32 a training step on either device gives the same logits, gradients and
BatchNorm running statistics, and so do the eval logits after it; under bf16 autocast the step stays finite.
"""
import copy
from typing import Dict, Tuple

import pytest
import torch

from test_compile import _TWO_STAGES, _close, tiny_model

# name -> (family, create kwargs on top of its tiny config, image size or None for the tiny config's)
CASES = {
    'cnt': ('cnt', {}, None),
    'cnt_16_channels': ('cnt', dict(inner_dim=16), None),  # CNT-S's inner width: aten's norm on the GEMM's output
    'cnt_distilled': ('cnt_distilled', {}, None),
    'transcnn': ('transcnn', _TWO_STAGES, 40),
    'hatnet': ('hatnet', _TWO_STAGES, 40),
    'refiner': ('refiner', {}, None),
}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def _case(name: str) -> Tuple[torch.nn.Module, torch.Tensor]:
    return tiny_model(*CASES[name])


def train_step(model: torch.nn.Module, x: torch.Tensor, weights: torch.Tensor, amp: bool = False) -> Dict[str, object]:
    """ One training forward + backward of a fixed random projection of the logits: the logits, every parameter's
    gradient and the BatchNorm buffers, then the eval logits, all on the CPU in float32. """
    device = next(model.parameters()).device
    model.train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x.to(device))
    logits = out[0] if isinstance(out, tuple) else out  # distilled models train on (class, distillation) logits
    (logits.float() * weights.to(device)).sum().backward()
    with torch.no_grad():
        eval_logits = model.eval()(x.to(device))
    return dict(
        logits=logits.detach().float().cpu(), eval_logits=eval_logits.float().cpu(),
        grads={n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None},
        buffers={n: b.float().cpu() for n, b in model.named_buffers() if b.is_floating_point()})


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """ test_compile's tolerance (1e-4 of the expected values' scale, at least 1), with the error in the message: a
    device run is read from its log. """
    error = (actual - expected).abs().max().item()
    assert _close(actual, expected), f'{what}: max abs error {error:.3g} at scale {expected.abs().max().item():.3g}'


def assert_same_step(actual: Dict[str, object], expected: Dict[str, object]) -> None:
    assert actual['grads'].keys() == expected['grads'].keys() and len(expected['grads']) > 0
    assert actual['buffers'].keys() == expected['buffers'].keys()
    for key in ('logits', 'eval_logits'):
        assert_close(actual[key], expected[key], key)
    for kind in ('grads', 'buffers'):
        for name, value in expected[kind].items():
            assert_close(actual[kind][name], value, f'{kind} {name}')


@needs_cuda
@pytest.mark.parametrize('name', list(CASES))
def test_cuda_training_step_equals_the_cpus(name, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    model, x = _case(name)
    weights = torch.randn(x.shape[0], model.num_classes)
    gpu = copy.deepcopy(model).cuda()
    assert_same_step(train_step(gpu, x, weights), train_step(model, x, weights))


@needs_cuda
@pytest.mark.parametrize('name', list(CASES))
def test_cuda_bf16_training_step_stays_finite(name):
    model, x = _case(name)
    step = train_step(model.cuda(), x, torch.randn(x.shape[0], model.num_classes), amp=True)
    for what, value in [('logits', step['logits']), ('eval_logits', step['eval_logits']), *step['grads'].items()]:
        assert torch.isfinite(value).all(), what
