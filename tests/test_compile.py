""" Every family compiles: torch.compile(fullgraph=True) with inductor on CPU, eval forward and a training step.

Tiny configs from tests/test_reliability.py. Per family: `torch._dynamo.explain` finds no graph break (eval and
train mode), the compiled eval forward matches eager within 1e-4, and a compiled training step (forward + backward)
matches eager's logits, parameter gradients and BatchNorm running stats within 1e-4. Inductor generates C++ for each
graph, about 20-40 s per family on 2 cores. And CNT's compiled graph adds the pixels by concatenation, not
index_add (inductor's atomic adds), hands inductor its row norms' per-channel vectors as buffers, and trains on at a
second batch size (dynamic shapes).
"""
import copy

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from timm_hybrid.models._common import per_group, repeat_per_group
from test_reliability import create, image, with_batch_stats

# two stages cover every TransCNN / HAT-Net path (window + pooled attention with the padded-window mask at 40 px,
# downsample, global MHSA) at half the compile time of four
_TWO_STAGES = dict(
    embed_dims=(16, 32), depths=(1, 1), head_dim=8, mlp_ratios=(2, 2), kernel_sizes=(3, 3), window_sizes=(8, 1),
    pool_ratios=(4, 1))
# name -> (family, create kwargs on top of its tiny config, image size or None for the tiny config's). CNT's 'auto'
# inner block resolves to one of its two implementations (the tiny config's 8 channels: matmul on CPU); both compile.
# At 16 channels the matmul form's training norm is aten's on a view of the GEMM's output (a GPU's CNT-S path).
COMPILED = {
    'cnt_conv': ('cnt', dict(inner_block_args=dict(impl='conv')), None),
    'cnt_matmul': ('cnt', dict(inner_block_args=dict(impl='matmul')), None),
    'cnt_matmul_16': ('cnt', dict(inner_dim=16, inner_block_args=dict(impl='matmul')), None),
    'transcnn': ('transcnn', _TWO_STAGES, 40),
    'hatnet': ('hatnet', _TWO_STAGES, 40),
    'refiner': ('refiner', {}, None),
}


def tiny_model(family: str, kwargs: dict, size=None) -> tuple:
    """ The family's tiny config with `kwargs` (seeded), and a batch of 2 at `size` (None: the config's size); the
    BatchNorm running stats are that batch's (with_batch_stats), away from their (0, 1) start. """
    torch.manual_seed(0)
    model = create(family, **kwargs)
    x = image(model, 2) if size is None else torch.randn(2, 3, size, size)
    return with_batch_stats(model, x), x


def _model(name: str) -> tuple:
    return tiny_model(*COMPILED[name])


def _default_bn_momentum(model: torch.nn.Module) -> None:
    """ PyTorch's default momentum for training steps; with_batch_stats' cumulative average (None) reads a host
    scalar. """
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1


def _assert_no_graph_break(model: torch.nn.Module, x: torch.Tensor) -> None:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, [str(r) for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool((actual - expected).abs().max() <= 1e-4 * max(1., expected.abs().max().item()))


@pytest.mark.parametrize('name', sorted(COMPILED))
def test_compiled_eval_forward_matches_eager_without_graph_breaks(name):
    model, x = _model(name)
    _assert_no_graph_break(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend='inductor', fullgraph=True)
    with torch.no_grad():
        expected = model(x)
        assert (compiled(x) - expected).abs().max() < 1e-4


@pytest.mark.parametrize('name', sorted(COMPILED))
def test_compiled_training_step_matches_eager_without_graph_breaks(name):
    model, x = _model(name)
    model.train()
    _default_bn_momentum(model)
    _assert_no_graph_break(copy.deepcopy(model), x)  # explain runs the model: BatchNorm stats of a copy move
    eager, compiled_model = model, copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend='inductor', fullgraph=True)
    results = []
    for module, fn in ((eager, eager), (compiled_model, compiled)):
        out = fn(x)
        out.square().mean().backward()
        grads = {n: p.grad for n, p in module.named_parameters()}
        buffers = {n: b for n, b in module.named_buffers() if b.is_floating_point()}
        results.append((out.detach(), grads, buffers))
    (out_eager, grads_eager, buffers_eager), (out_compiled, grads_compiled, buffers_compiled) = results
    assert (out_compiled - out_eager).abs().max() < 1e-4
    assert [n for n, g in grads_compiled.items() if g is None] == []
    # relative to each gradient's own scale: gradients range over orders of magnitude between layers
    assert [n for n in grads_eager if not _close(grads_compiled[n], grads_eager[n])] == []
    assert [n for n in buffers_eager if not _close(buffers_compiled[n], buffers_eager[n])] == []


def test_compiled_cnt_adds_the_pixels_by_concatenation_and_eager_by_one_add():
    """ Inductor writes an index_add as atomic adds and splits the LayerNorm after it into passes (compiled CNT-S ran
    1.04x / 1.07x as fast with the concatenation, README): the graph dynamo hands the backend holds no index_add and
    a concatenation per block; eager adds into a fresh tensor, one add a block (`add_to_patch_tokens`). """
    model, x = _model('cnt_conv')
    model.eval()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(x)
        out = torch.compile(model, backend=recording_backend, fullgraph=True)(x)
    assert torch.equal(out, expected)
    nodes = [n for g in graphs for n in g.graph.nodes if n.op in ('call_function', 'call_method')]
    assert [n.target for n in nodes if 'index_add' in str(n.target)] == []
    assert sum(n.target is torch.cat for n in nodes) >= len(model.blocks)  # + the class token's

    with torch.profiler.profile() as prof, torch.no_grad():
        model(x)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get('aten::index_add', 0) == 0 and counts['aten::add'] >= len(model.blocks)


@pytest.mark.skipif(repeat_per_group is None, reason='per_group runs its operator from torch 2.5')
def test_compiled_row_norms_hand_inductor_their_per_channel_vectors_as_buffers():
    """ Traced, `per_group`'s expand becomes a modulo-index gather inside inductor's row loops, which its C++ code runs
    as scalar code (CNT-Ti's row BatchNorms, `per_group`). Compiled for the CPU, the CNT matmul form's training step
    hands inductor the repeated vectors as the outputs of `timm_hybrid::repeat_per_group`, in forward (the norm's scale
    and shift) and backward (its gradient coefficients); eager runs no such operator. """
    model, x = _model('cnt_matmul')
    model.train()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    compiled(x).square().mean().backward()
    op = torch.ops.timm_hybrid.repeat_per_group.default
    assert len(graphs) == 2  # forward, backward
    assert [sum(n.target is op for n in g.graph.nodes) >= 2 * len(model.blocks) for g in graphs] == [True, True]

    with torch.profiler.profile() as prof:
        model(x).square().mean().backward()
    assert 'timm_hybrid::repeat_per_group' not in {e.key for e in prof.key_averages()}


@pytest.mark.skipif(repeat_per_group is None, reason='per_group runs its operator from torch 2.5')
def test_compiled_per_group_gives_eagers_values_and_gradients():
    """ `repeat_per_group` (what `per_group` runs compiled on CPU) repeats like the eager copy and sums the gradient
    of every group back into its channel. """
    torch.manual_seed(0)
    weights = torch.randn(5, 12)

    def loss(values):
        repeated, absent = per_group(4, values, None)
        return (repeated * weights.flatten()[:20]).sum() ** 2, repeated, absent

    values = torch.randn(5, requires_grad=True)
    expected, expected_repeat, _ = loss(values)
    (expected_grad,) = torch.autograd.grad(expected, values)
    torch._dynamo.reset()
    actual, actual_repeat, absent = torch.compile(loss, backend='inductor', fullgraph=True)(values)
    (actual_grad,) = torch.autograd.grad(actual, values)
    assert absent is None and torch.equal(actual_repeat, expected_repeat)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_grad, expected_grad)


def test_compiled_cnt_trains_at_a_second_batch_size():
    """ A second batch size makes dynamo recompile with a dynamic batch dim (automatic dynamic shapes). The row norms'
    statistics then must trace without static shapes: aten's `batch_norm_update_stats` has no fake implementation, and
    the CNT matmul form's second training step failed with 'Operator does not support running with fake tensors'.
    Both steps match eager (logits and parameter gradients). """
    model, x = _model('cnt_matmul')
    model.train()
    _default_bn_momentum(model)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend='inductor', fullgraph=True)
    for batch_size in (2, 3):
        images = torch.randn(batch_size, *x.shape[1:])
        out, expected = compiled(images), eager(images)
        out.square().mean().backward()
        expected.square().mean().backward()
        assert (out - expected).abs().max() < 1e-4
        grads = dict(eager.named_parameters())
        assert [n for n, p in model.named_parameters() if not _close(p.grad, grads[n].grad)] == []
        model.zero_grad()
        eager.zero_grad()
