""" How many bytes an eager step moves through memory, and what that bounds on a GPU, counted without one.

    python benchmarks/memory_traffic.py     # the S models against DeiT-S -> benchmarks/results/traffic/bf16.*
    python benchmarks/memory_traffic.py --bandwidth 4.3e12 --stem bf16_h200 \
        --measured benchmarks/results/nvidia-h200/benchmark.json   # at the H200's bandwidth, its measured steps beside
    python benchmarks/memory_traffic.py --models cnt_s_patch16_224 --reference deit_small_patch16_224
    python benchmarks/memory_traffic.py --compiled   # adds the step under torch.compile (below); about 15 minutes

A GPU step of these models at batch 256 is bound by memory as much as by arithmetic: every eager op that is not a
GEMM reads its inputs and writes its outputs once, a kernel of its own. This counts, under a TorchDispatchMode on
the CPU, each aten op's bytes (the tensors it reads and writes, broadcast dimensions once, views and metadata ops
free) and FLOPs (torch.utils.flop_counter's formulas; the CPU's fused attention as the GPU's), for one inference
forward and one training step (forward, cross-entropy, backward, AdamW) on the code paths a CUDA step takes
(`GPU_PATHS`: the settings the models pick on CUDA, forced here). Bytes grow with the batch: two small batches give
the per-image and fixed parts, and the table gives them at `--batch-size` (256, as timm's benchmark.py on a GPU).

Dtypes follow CUDA's bf16 autocast: matmuls and convolutions in bf16; softmax, log-softmax, layer norm, group norm
and cross-entropy in float32, as CUDA's autocast runs them (the CPU's autocast keeps those in bf16, so a
TorchFunctionMode casts their inputs first); the rest in whatever dtype their inputs come in. `--fp32` counts without
autocast.

`roofline_ms`: the sum over ops of max(bytes / bandwidth, FLOPs / matmul peak), at the H100 that the device tool
lends (3.0 TB/s device-to-device copy, 790 TFLOP/s bf16 matmul, read there; `--bandwidth`, `--peak`). It is a floor
for eager mode, where each op is a kernel that moves its own bytes: cache reuse between ops is not counted (an L2
of 50 MB holds little of a batch-256 step's tensors), nor launch latency. `<infer|train>_x_<reference>` divides the
reference's floor by the model's: the ratio if both ran at their floors (or at the same fraction of them);
`--measured` adds each step's measured time and the fraction of its floor it reached.

`--compiled` adds the same step with the model under torch.compile, as inductor would run it on a GPU: the forward
and backward graphs are lowered and their kernels scheduled (fused) as for Triton, inductor's GPU backend
(`cpu_backend='triton'`, so no GPU is needed); each kernel's bytes are those inductor itself accounts it
(`get_read_write_buffers_sizes`: every buffer it reads or writes once), each extern kernel's (GEMMs, convolutions,
attention) FLOPs as above; no kernel code is generated, the graphs run eagerly. The optimizer step stays eager
(timm's benchmark.py compiles the model, not the optimizer) and is counted as above. The floor then sums kernels, not
ops. Where this differs from a CUDA compile: the graphs are traced with CPU tensors, so a layout inductor fixes to the
strides an op had when traced (a convolution's backward) is the CPU's, and inductor copies into it where CUDA's may
need no copy (Refiner-S: 135 of 2045 MB an image; CNT-S and DeiT-S: under 1 MB).
"""
import argparse
import contextlib
import json
import math
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple
from unittest import mock

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import conv_flop_count, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from timm_hybrid.compare import create_model_spec, reference_short_name, write_results

RESULTS = Path(__file__).resolve().parent / 'results' / 'traffic'
# what a CUDA training step runs, forced on the CPU: CNT's inner block as GEMMs and its outer MLP keeping its
# activations ('auto' and 'cpu' pick these on CUDA); Refiner's refinement channels-last with per-image BatchNorm
# statistics, and no family's CPU chunks (TransCNN / HAT-Net run channels-last everywhere)
GPU_PATHS = {
    'cnt': dict(inner_impl='matmul', recompute_mlp_act=False),
    'refiner_vit': dict(refine_channels_last=True, refine_image_stats=True, cpu_chunk=0),
    'transcnn': dict(cpu_chunk=0),
    'hatnet': dict(cpu_chunk=0),
}
# the same under torch.compile, where Refiner's per-image BatchNorm statistics are off by default (inductor writes its
# own BatchNorm kernels) and its chunks off anyway (`refine_image_stats` None: off while compiling)
COMPILED_GPU_PATHS = {**GPU_PATHS, 'refiner_vit': dict(refine_channels_last=True, cpu_chunk=0)}
DEFAULT_MODELS = ('cnt_s_patch16_224', 'tnt_s_patch16_224', 'refiner_vit_small_patch16_224', 'hatnet_small',
                  'transcnn_small', 'deit_small_patch16_224')
# ops that move no data (views, metadata) or only a scalar to the host
FREE_OPS = {
    'view', '_unsafe_view', 'reshape', 'permute', 'transpose', 't', 'expand', 'as_strided', 'unsqueeze', 'squeeze',
    'slice', 'select', 'detach', 'alias', 'split', 'split_with_sizes', 'unbind', 'chunk', 'narrow', 'view_as',
    'unflatten', 'flatten', 'empty', 'empty_like', 'empty_strided', 'new_empty', 'new_empty_strided', 'lift_fresh',
    '_local_scalar_dense', 'is_same_size', 'sym_size', 'sym_stride', 'sym_numel', 'result_type',
}
# CUDA's autocast runs these in float32 (its fp32 list); the CPU's keeps them in the low precision
CUDA_FP32_FUNCTIONS = {F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.log_softmax,
                       torch.Tensor.log_softmax, F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm,
                       F.cross_entropy}


def touched_bytes(t: torch.Tensor) -> int:
    """ Bytes an op reads or writes of `t`: its elements, a broadcast (stride-0) dimension once. """
    elements = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return elements * t.element_size()


def op_flops(func, args, kwargs, out) -> int:
    packet = func.overloadpacket
    name = packet.__name__
    if name == '_scaled_dot_product_flash_attention_for_cpu':  # the GPU's fused attention does the same work
        return sdpa_flop_count(*(a.shape for a in args[:3]))
    if name == '_scaled_dot_product_flash_attention_for_cpu_backward':
        return sdpa_backward_flop_count(*(a.shape for a in args[:4]))
    if name == 'convolution_backward':
        # the input gradient and the weight gradient each cost the forward's FLOPs; flop_counter's own formula
        # ignores groups in the weight gradient (a depthwise conv's counted C times over)
        grad_out, x, weight, *_, transposed, _, _, output_mask = args
        return conv_flop_count(x.shape, weight.shape, grad_out.shape, transposed) * sum(map(bool, output_mask[:2]))
    if packet in flop_registry:
        return flop_registry[packet](*args, **kwargs, out_val=out)
    return 0


class TrafficCounter(TorchDispatchMode):
    """ Per aten op (by name): calls, bytes read + written, FLOPs. """

    def __init__(self):
        super().__init__()
        self.calls, self.bytes, self.flops = Counter(), Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name.rstrip('_') in FREE_OPS or name in FREE_OPS:
            return out
        tensors = {id(t): t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        written = {id(t): t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
        self.calls[name] += 1
        self.bytes[name] += sum(touched_bytes(t) for t in tensors.values())
        self.bytes[name] += sum(touched_bytes(t) for t in written.values())
        self.flops[name] += op_flops(func, args, kwargs, out)
        return out


class CudaAutocastFp32(TorchFunctionMode):
    """ Under the CPU's autocast, runs CUDA autocast's float32 functions in float32 as CUDA would. """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CUDA_FP32_FUNCTIONS and torch.is_autocast_enabled('cpu'):
            def up(x):
                return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            with torch.autocast('cpu', enabled=False):
                return func(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
        return func(*args, **kwargs)


def gpu_spec(spec: str, compiled: bool = False) -> str:
    """ `spec` with the settings a CUDA step takes (GPU_PATHS, or COMPILED_GPU_PATHS under torch.compile) for its
    family, unless the spec sets them. """
    paths = COMPILED_GPU_PATHS if compiled else GPU_PATHS
    name, _, given = spec.partition(':')
    family = next((f for f in paths if name.startswith(f + '_')), None)
    if family is None:
        return spec
    given_keys = {item.split('=')[0] for item in given.split(',') if item}
    extra = [f'{k}={v}' for k, v in paths[family].items() if k not in given_keys]
    return name + ':' + ','.join(filter(None, [given, *extra]))


class _Scheduled(Exception):
    """ Raised once a graph's kernels are scheduled and counted: inductor generates no code for them. """


def _extern_kernel_flops(node) -> int:
    """ The FLOPs of an extern kernel (GEMM, convolution, attention) by `op_flops`, from the aten op it was made of
    (inductor's own `estimate_flops` counts no CPU attention, and a depthwise conv's weight gradient C times over). """
    from torch._inductor.fx_utils import get_fake_args_kwargs
    from torch._subclasses.fake_tensor import FakeTensorMode
    if node.node is None:
        return 0
    # a fallback kernel (attention, a convolution's backward) names no origin node of its own: the one of its op
    fx_node = node.node.get_origin_node() or next(
        (o for o in node.node.origins if o.target == getattr(node.node, 'op_overload', None)), None)
    if fx_node is None or not isinstance(fx_node.target, torch._ops.OpOverload):
        return 0
    with FakeTensorMode(allow_non_fake_inputs=True):
        found, args, kwargs = get_fake_args_kwargs(fx_node)
        return op_flops(fx_node.target, args, kwargs, fx_node.meta.get('val')) if found else 0


class KernelCounter:
    """ The kernels inductor makes of the graphs that `backend` compiles, scheduled as for Triton (a GPU's backend)
    on the CPU: per kernel (in order) the bytes inductor accounts it and, for an extern kernel, its FLOPs (`op_flops`
    of the aten op it runs). `backend` is a torch.compile backend: it lowers and schedules each forward / backward
    graph as torch.compile's inductor would, records its kernels, and returns the graph to run eagerly. Compile and
    run backward under `settings()`. """

    def __init__(self):
        self.kernels: List[Tuple[int, int, bool]] = []  # (bytes, flops, an extern kernel)
        self.graphs = 0

    @staticmethod
    @contextlib.contextmanager
    def settings() -> Iterator[None]:
        """ What the compiled step runs under, backward included: kernels for Triton on CPU tensors, and no cache (a
        graph found in inductor's or AOTAutograd's cache would not be scheduled again, so not counted). """
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config
        with inductor_config.patch(cpu_backend='triton', fx_graph_cache=False, fx_graph_remote_cache=False), \
                functorch_config.patch(enable_autograd_cache=False):
            yield

    def backend(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs, inner_compile=self._schedule)

    def _record(self, scheduler) -> None:
        from torch._inductor.scheduler import ExternKernelSchedulerNode, NopKernelSchedulerNode
        for node in scheduler.nodes:
            if isinstance(node, NopKernelSchedulerNode):
                continue
            extern = isinstance(node, ExternKernelSchedulerNode)
            self.kernels.append((node.get_read_write_buffers_sizes(), _extern_kernel_flops(node) if extern else 0,
                                 extern))
        self.graphs += 1
        raise _Scheduled()

    def _schedule(self, gm: torch.fx.GraphModule, example_inputs, **kwargs):
        from functorch.compile import make_boxed_func
        from torch._inductor.compile_fx import compile_fx_inner
        from torch._inductor.scheduler import Scheduler
        graphs = self.graphs
        with mock.patch.object(Scheduler, 'codegen', lambda scheduler: self._record(scheduler)):
            try:
                compile_fx_inner(gm, example_inputs, **kwargs)
            except Exception:  # inductor wraps what codegen raises; a graph counted is all that was asked
                if self.graphs == graphs:
                    raise
        return make_boxed_func(gm.forward)


def _model_and_batch(spec: str, batch_size: int, train: bool,
                     compiled: bool = False) -> Tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """ `spec` on its CUDA paths (gpu_spec), seeded, in train or eval mode, with a random batch and its targets. """
    torch.manual_seed(0)
    model = create_model_spec(gpu_spec(spec, compiled)).train(train)
    x = torch.randn(batch_size, *model.pretrained_cfg['input_size'])
    return model, x, torch.zeros(batch_size, dtype=torch.long)


def _forward_loss(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, amp: bool,
                  train: bool) -> Optional[torch.Tensor]:
    """ The step's forward under CUDA's bf16 autocast (`amp`, float32 ops in float32): the cross-entropy loss of a
    training step, None for an inference forward (under no_grad: inference_mode would hand the counters
    undecomposed ops, `linear` for the GEMM, a `to` that copies nothing). """
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp), CudaAutocastFp32():
        if not train:
            with torch.no_grad():
                model(x)
            return None
        out = model(x)  # distilled models in training return (cls, dist) logits
        return F.cross_entropy(out[0] if isinstance(out, tuple) else out, target)


def compiled_count_step(spec: str, batch_size: int, amp: bool = True,
                        train: bool = True) -> Tuple[KernelCounter, Optional[TrafficCounter]]:
    """ `count_step` with the model under torch.compile (COMPILED_GPU_PATHS): its kernels as inductor schedules them
    for a GPU (`KernelCounter`), and for a training step the eager optimizer step's ops (TrafficCounter). """
    torch._dynamo.reset()
    model, x, target = _model_and_batch(spec, batch_size, train, compiled=True)
    kernels = KernelCounter()
    compiled = torch.compile(model, backend=kernels.backend, dynamic=False)
    with kernels.settings():
        loss = _forward_loss(compiled, x, target, amp, train)
        if loss is None:
            return kernels, None
        loss.backward()  # compiles (and counts) the backward graph
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    optimizer.step()  # creates its state
    optimizer_ops = TrafficCounter()
    with optimizer_ops:
        optimizer.step()
    return kernels, optimizer_ops


def count_step(spec: str, batch_size: int, amp: bool = True, train: bool = True) -> TrafficCounter:
    """ One training step of `spec` (GPU paths, see gpu_spec) at `batch_size`, or one inference forward, its ops
    counted. A step runs first uncounted (AdamW creates its state in its first step). The step is compare.make_step's,
    written here because that one infers under inference_mode (see `_forward_loss`). """
    model, x, target = _model_and_batch(spec, batch_size, train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = _forward_loss(model, x, target, amp, train)
        if loss is None:
            return
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step()
    counter = TrafficCounter()
    with counter:
        step()
    return counter


def extrapolate(value_lo: float, value_hi: float, small: Tuple[int, int], batch_size: int) -> float:
    """ A count taken at the two `small` batches, at `batch_size`: a + b * batch (a the weights' and optimizer's part,
    b the images'). """
    return value_lo + (value_hi - value_lo) / (small[1] - small[0]) * (batch_size - small[0])


def extrapolated_ops(lo: TrafficCounter, hi: TrafficCounter, small: Tuple[int, int],
                     batch_size: int) -> Dict[str, Tuple[float, float]]:
    """ Each op's (bytes, FLOPs) at `batch_size`, from its counts at the two `small` batches. """
    return {op: (extrapolate(lo.bytes[op], hi.bytes[op], small, batch_size),
                 extrapolate(lo.flops[op], hi.flops[op], small, batch_size)) for op in hi.calls}


def floor_seconds(costs: Iterable[Tuple[float, float]], bandwidth: float, peak: float) -> float:
    """ The roofline floor of kernels (or eager ops) given as (bytes, FLOPs): each bound by its memory traffic or
    its arithmetic, whichever takes longer. """
    return sum(max(moved / bandwidth, flops / peak) for moved, flops in costs)


def traffic_columns(spec: str, train: bool, batch_size: int, small: Tuple[int, int], amp: bool, bandwidth: float,
                    peak: float) -> Dict[str, object]:
    """ Ops, GB, GFLOPs and the roofline floor of one step (or inference forward) at `batch_size`, each op's bytes and
    FLOPs extrapolated from the two `small` batches (a + b * batch: a the weights' and optimizer's, b the images'). """
    lo, hi = (count_step(spec, b, amp, train) for b in small)
    ops = extrapolated_ops(lo, hi, small, batch_size)
    floor_s = floor_seconds(ops.values(), bandwidth, peak)
    prefix = 'train' if train else 'infer'
    columns = {f'{prefix}_ops': sum(hi.calls.values()),
               f'{prefix}_gb': round(sum(moved for moved, _ in ops.values()) / 1e9, 1),
               f'{prefix}_gflops': round(sum(flops for _, flops in ops.values()) / 1e9),
               f'{prefix}_roofline_ms': float(f'{floor_s * 1e3:.4g}')}
    if train:
        top = sorted(ops, key=lambda op: -ops[op][0])[:5]
        columns['train_most_bytes'] = ', '.join(f'{op} {ops[op][0] / 1e9:.1f} GB' for op in top)
    return columns


def compiled_traffic_columns(spec: str, train: bool, batch_size: int, small: Tuple[int, int], amp: bool,
                             bandwidth: float, peak: float) -> Dict[str, object]:
    """ `traffic_columns` of the compiled step (`compiled_count_step`), suffixed `_compiled`: kernels (at the larger
    small batch), GB and floor at `batch_size`, extrapolated from the two `small` batches: each extern kernel's bytes
    and FLOPs (the same GEMMs at both batches: they pair up in order), the generated kernels' bytes in all (inductor
    may fuse or split their reductions differently at another batch; their floor is their bytes / bandwidth
    either way), plus the eager optimizer step's ops. """
    (lo, lo_optimizer), (hi, hi_optimizer) = (compiled_count_step(spec, b, amp, train) for b in small)
    extern_lo, extern_hi = ([(b, f) for b, f, extern in c.kernels if extern] for c in (lo, hi))
    if len(extern_lo) != len(extern_hi):
        raise RuntimeError(f'{spec}: inductor made {len(extern_lo)} extern kernels at batch {small[0]} and '
                           f'{len(extern_hi)} at batch {small[1]}; they cannot be paired.')
    kernels = [(extrapolate(b_lo, b_hi, small, batch_size), extrapolate(f_lo, f_hi, small, batch_size))
               for (b_lo, f_lo), (b_hi, f_hi) in zip(extern_lo, extern_hi)]
    generated_lo, generated_hi = (sum(b for b, _, extern in c.kernels if not extern) for c in (lo, hi))
    kernels.append((extrapolate(generated_lo, generated_hi, small, batch_size), 0))
    if train:
        kernels += extrapolated_ops(lo_optimizer, hi_optimizer, small, batch_size).values()
    floor_s = floor_seconds(kernels, bandwidth, peak)
    prefix = 'train' if train else 'infer'
    return {f'{prefix}_kernels_compiled': len(hi.kernels),
            f'{prefix}_gb_compiled': round(sum(moved for moved, _ in kernels) / 1e9, 1),
            f'{prefix}_roofline_ms_compiled': float(f'{floor_s * 1e3:.4g}')}


def traffic_row(spec: str, batch_size: int, small: Tuple[int, int], amp: bool, bandwidth: float,
                peak: float, compiled: bool = False) -> Dict[str, object]:
    row = dict(model=spec, batch_size=batch_size)
    for train in (False, True):
        row.update(traffic_columns(spec, train, batch_size, small, amp, bandwidth, peak))
        if compiled:
            row.update(compiled_traffic_columns(spec, train, batch_size, small, amp, bandwidth, peak))
    return row


def traffic_table(specs: Sequence[str], reference: str, batch_size: int = 256, small: Tuple[int, int] = (2, 4),
                  amp: bool = True, bandwidth: float = 3.0e12, peak: float = 7.9e14,
                  compiled: bool = False) -> List[Dict[str, object]]:
    rows = {s: traffic_row(s, batch_size, small, amp, bandwidth, peak, compiled)
            for s in dict.fromkeys([*specs, reference])}
    short = reference_short_name(reference)
    for row in rows.values():
        for prefix in ('infer', 'train'):
            for suffix in ('', '_compiled') if compiled else ('',):
                key = f'{prefix}_roofline_ms{suffix}'
                row[f'{prefix}_x_{short}{suffix}'] = round(rows[reference][key] / row[key], 3)
    return [rows[s] for s in specs]


def add_measured(rows: Sequence[Dict[str, object]], benchmark_json: Path) -> None:
    """ Each row's measured step times from a device_benchmark.py `benchmark.json` (`<prefix>_step_time`, ms) and the
    fraction of the floor they reach, `<prefix>_floor_fraction` = roofline / measured: how close the eager kernels came
    to moving their bytes at full bandwidth. Models it did not time are left as they are. """
    measured = {r['model']: r for r in json.loads(Path(benchmark_json).read_text())['rows']}
    for row in rows:
        timed = measured.get(row['model'], {})
        for prefix in ('infer', 'train'):
            if f'{prefix}_step_time' in timed:
                row[f'{prefix}_step_time'] = timed[f'{prefix}_step_time']
                row[f'{prefix}_floor_fraction'] = round(row[f'{prefix}_roofline_ms'] / timed[f'{prefix}_step_time'], 3)


def plot_traffic(rows: Sequence[Dict[str, object]], reference: str, path: Path) -> None:
    """ GB a step moves (inference, training), and the floor ratio to the reference, a bar per model and step (and
    per compiled step, where the rows have them). """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    short = reference_short_name(reference)
    series = [('infer', '', 'inference'), ('train', '', 'train step')]
    if 'train_gb_compiled' in rows[0]:
        series = [('infer', '', 'inference'), ('infer', '_compiled', 'inference, compiled'),
                  ('train', '', 'train step'), ('train', '_compiled', 'train step, compiled')]
    height = 0.8 / len(series)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.3 * len(series) * len(rows) + 2))
    y = range(len(rows))
    for ax, (key, label) in zip(axes, (('gb', 'GB moved a step'), (f'x_{short}', f'roofline floor x {reference}'))):
        for i, (prefix, suffix, name) in enumerate(series):
            offset = (i - (len(series) - 1) / 2) * height
            ax.barh([j + offset for j in y], [r[f'{prefix}_{key}{suffix}'] for r in rows], height=height, label=name)
        ax.set_yticks(list(y), [r['model'] for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.legend()
    fig.suptitle(f'CUDA paths, batch {rows[0]["batch_size"]}; floor: each op (compiled: each kernel) at '
                 f'max(bytes / bandwidth, FLOPs / matmul peak)', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS))
    parser.add_argument('--reference', default='deit_small_patch16_224')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--fp32', action='store_true', help='count without autocast (float32 throughout)')
    parser.add_argument('--bandwidth', type=float, default=3.0e12, help='bytes/s (default: the H100 here)')
    parser.add_argument('--peak', type=float, default=7.9e14, help='matmul FLOP/s (default: the H100 here, bf16)')
    parser.add_argument('--measured', type=Path, default=None,
                        help="a device_benchmark.py benchmark.json of the same models: adds each step's measured time "
                             'and the fraction of its floor it reached (floor / measured)')
    parser.add_argument('--compiled', action='store_true',
                        help='add the step under torch.compile, its kernels as inductor schedules them for a GPU '
                             '(`<prefix>_gb_compiled`, `_roofline_ms_compiled`, `_x_<reference>_compiled`)')
    parser.add_argument('--stem', default=None, help="the tables' file name (default: bf16, or fp32)")
    parser.add_argument('--output', type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = traffic_table(args.models, args.reference, args.batch_size, amp=not args.fp32, bandwidth=args.bandwidth,
                         peak=args.peak, compiled=args.compiled)
    precision = 'float32' if args.fp32 else "bf16 autocast, CUDA's float32 ops in float32"
    meta = dict(settings=f'one eager inference forward and training step (AdamW), CUDA code paths forced on the CPU, '
                         f'batch {args.batch_size} (extrapolated from 2 and 4), {precision}, bandwidth '
                         f'{args.bandwidth / 1e12:g} TB/s, matmul peak {args.peak / 1e12:g} TFLOP/s')
    if args.compiled:
        meta['compiled'] = ('the same step with the model under torch.compile (inductor, default mode): its forward '
                            'and backward kernels as inductor schedules them for Triton, the optimizer step eager')
    if args.measured is not None:
        add_measured(rows, args.measured)
        meta['measured'] = str(args.measured)
    stem = args.stem or ('fp32' if args.fp32 else 'bf16')
    title = 'Memory traffic of an eager step, and its floor on a GPU'
    written = write_results(rows, args.output, stem, meta, title=title)
    plot_traffic(rows, args.reference, written.with_suffix('.png'))
    print(f'written: {written}.md, .csv, .json, .png')


if __name__ == '__main__':
    main()
