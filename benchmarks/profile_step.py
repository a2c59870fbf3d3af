""" Where one step's time goes: one inference or training step (compare's own step: forward + cross-entropy + backward
+ AdamW), ops grouped by input shape, largest self time first. One step of a shared machine: read the shares, not the
milliseconds.

On CPU each aten op is timed where it is dispatched (wall time around the op, a `TorchDispatchMode`), with the minor
page faults it took: the ops' times add up to the step's. `torch.profiler` (`--torch-profiler`) slowed Refiner-S's
training step from 8.8 to 10.8-13.4 s and its large-map ops most: a softmax backward over (32, 12, 197, 197) maps took
352-775 ms under it, 45 ms timed at dispatch (2 threads, batch 32, `--malloc keep`). On a GPU the ops are ranked by
their kernels' time under `torch.profiler`.

    python benchmarks/profile_step.py refiner_vit_small_patch16_224:depth=4 --train --threads 2 --batch-size 32
    # -> benchmarks/results/profile/<model spec>-<train|infer>.{csv,md,json}
    python benchmarks/profile_step.py cnt_s_patch16_224 --train --device cuda   # bf16 autocast, batch 256
    # -> benchmarks/results/<gpu name>/profile/...: ops ranked by their kernels' time on the GPU (self_ms)
    python benchmarks/profile_step.py refiner_vit_small_patch16_224 --train --faults
    # -> benchmarks/results/profile/<model spec>-train-faults.{csv,md,json}: ops ranked by the page faults they took
"""
import argparse
import re
import resource
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from timm_hybrid.compare import AMP_DTYPES, MALLOC_SETTINGS, SpeedSettings, create_model_spec, device_folder_name, \
    make_step, processor_name, write_results

RESULTS = Path(__file__).resolve().parent / 'results'


def _prepared_step(spec: str, settings: SpeedSettings, train: bool, warmup: int) -> Callable[[], None]:
    """ compare's step of model `spec` after `warmup` steps (the first ones allocate the optimizer state and grow
    malloc's heap). """
    torch.set_num_threads(settings.threads)
    settings.apply_malloc()
    model = create_model_spec(spec).to(settings.device)
    step = make_step(model, tuple(model.pretrained_cfg['input_size']), settings, train=train)
    for _ in range(warmup):
        step()
    return step


def profile_step(spec: str, settings: SpeedSettings, train: bool = True, rows: int = 20, warmup: int = 6,
                 torch_profiler: bool = False) -> Tuple[List[Dict[str, object]], Dict[str, object]]:
    """ One step of model `spec` after `warmup` steps: the `rows` ops with the most self time, grouped by input
    shape, and the meta of the table. On CPU timed at dispatch (`count_step`; `torch_profiler`: under
    `torch.profiler`, which slows large-map ops many-fold), on a GPU their kernels' time under `torch.profiler`. """
    if not (settings.on_gpu or torch_profiler):
        return count_step(spec, settings, train, rows, warmup, rank='self_ms')
    on_gpu = settings.on_gpu
    step = _prepared_step(spec, settings, train, warmup)
    # on a GPU an op's self time is its kernels' time on the device; its CPU time is mostly the launch
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()  # synchronizes the device before it returns
    # on a GPU the averages list each kernel twice, under the op that launched it and as an event of its own (device
    # type CUDA): keep the ops
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.device_type == DeviceType.CPU]

    def self_us(event) -> float:
        return event.self_device_time_total if on_gpu else event.self_cpu_time_total

    total_ms = sum(self_us(e) for e in events) / 1000
    table = [
        dict(op=e.key, input_shapes=str(e.input_shapes), calls=e.count,
             self_ms=round(self_us(e) / 1000, 2 if on_gpu else 1),
             self_share=round(self_us(e) / 1000 / total_ms, 3))
        for e in sorted(events, key=lambda e: -self_us(e))[:rows]]
    meta = dict(settings=settings.describe() + f', one step after {warmup} warm-up', processor=processor_name(settings),
                self_ms='the ops\' own time on the ' + ('GPU (their kernels)' if on_gpu else 'CPU (torch.profiler)'),
                self_ms_all_ops=round(total_ms, 1))
    return table, meta


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _OpCounter(TorchDispatchMode):
    """ Each aten op's wall time (around the op alone) and the minor page faults it took (the process's count before
    and after it), by op and input shapes. The mode sees the ops autograd and composite ops dispatch to, each once:
    an op's nested calls run below the mode. """

    def __init__(self):
        super().__init__()
        self.seconds, self.faults, self.calls = Counter(), Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = _minor_faults()
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        seconds = time.perf_counter() - start
        key = (func.name(), str([list(a.shape) for a in args if isinstance(a, torch.Tensor)]))  # 'aten::add.Tensor'
        self.faults[key] += _minor_faults() - before
        self.seconds[key] += seconds
        self.calls[key] += 1
        return out


def count_step(spec: str, settings: SpeedSettings, train: bool = True, rows: int = 20, warmup: int = 6,
               rank: str = 'self_ms') -> Tuple[List[Dict[str, object]], Dict[str, object]]:
    """ One CPU step of model `spec` after `warmup` steps with each aten op's wall time and minor page faults
    (`_OpCounter`), grouped by op and input shapes: the `rows` ops with the most `rank` ('self_ms' or 'faults').
    With glibc's defaults a tensor above malloc's mmap threshold is mapped, and faulted in, anew each time one is
    made, and memory the heap returns at its top faults again when the heap grows back; `timm-hybrid compare`
    reports the faults a step, this says which ops take them. The meta gives the counted step's time and that of the
    step before it, which ran without the counter (the counter's own cost is the difference). """
    if settings.on_gpu:
        raise ValueError('Ops are timed at dispatch, and page faults counted, for CPU steps only.')
    if rank not in ('self_ms', 'faults'):
        raise ValueError(f"rank must be 'self_ms' or 'faults', got {rank!r}.")
    step = _prepared_step(spec, settings, train, warmup)
    start = time.perf_counter()
    step()
    plain_ms = (time.perf_counter() - start) * 1000
    counter = _OpCounter()
    before = _minor_faults()
    start = time.perf_counter()
    with counter:
        step()
    counted_ms = (time.perf_counter() - start) * 1000
    step_faults = _minor_faults() - before
    total_ms = sum(counter.seconds.values()) * 1000
    total_faults = sum(counter.faults.values())
    ranked = counter.seconds if rank == 'self_ms' else counter.faults
    table = []
    for key in sorted(counter.calls, key=lambda k: -ranked[k])[:rows]:
        ms, faults = counter.seconds[key] * 1000, counter.faults[key]
        table.append(dict(op=key[0], input_shapes=key[1], calls=counter.calls[key], self_ms=round(ms, 1),
                          self_share=round(ms / max(total_ms, 1e-9), 3), faults=faults,
                          faults_share=round(faults / max(total_faults, 1), 3)))
    meta = dict(settings=settings.describe() + f', one step after {warmup} warm-up', processor=processor_name(settings),
                self_ms='each op\'s wall time where it is dispatched',
                faults='minor page faults the op took (getrusage around each aten op)',
                self_ms_all_ops=round(total_ms, 1), step_ms=round(counted_ms, 1),
                step_ms_uncounted=round(plain_ms, 1), ops=sum(counter.calls.values()),
                faults_all_ops=total_faults, faults_step=step_faults)
    return table, meta


def faults_step(spec: str, settings: SpeedSettings, train: bool = True, rows: int = 20,
                warmup: int = 6) -> Tuple[List[Dict[str, object]], Dict[str, object]]:
    """ `count_step` ranked by page faults. """
    return count_step(spec, settings, train, rows, warmup, rank='faults')


def write_profile(spec: str, train: bool, table: Sequence[Dict[str, object]], meta: Dict[str, object],
                  out: Path, kind: str = '') -> Path:
    """ `profile_step`'s table as `<spec>-<train|infer>.csv/.md/.json` in `out` (`faults_step`'s with `kind`
    'faults': `<spec>-<train|infer>-faults.*`); returns the Markdown file. """
    stem = re.sub(r'[^0-9A-Za-z_.=-]+', '_', spec) + ('-train' if train else '-infer') + (f'-{kind}' if kind else '')
    title = f'{spec}: {"training step" if train else "inference"}' + (f' ({kind})' if kind else '')
    write_results(table, out, stem, meta, title=title)
    return out / f'{stem}.md'


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('model', help='timm name or compare model spec, e.g. cnt_ti_patch16_224:inner_impl=conv')
    p.add_argument('--train', action='store_true', help='a training step (default: inference)')
    p.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    p.add_argument('--amp', choices=sorted(AMP_DTYPES), default=None, help='autocast dtype (default: bf16 on a GPU)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--batch-size', type=int, default=None, help='default: 256 on a GPU, 32 on a CPU')
    p.add_argument('--output', type=Path, default=None,
                   help='default: benchmarks/results/profile, on a GPU benchmarks/results/<gpu name>/profile')
    p.add_argument('--rows', type=int, default=20, help='ops to keep (default: %(default)s)')
    p.add_argument('--malloc', choices=MALLOC_SETTINGS, default='default',
                   help="'keep': glibc's malloc keeps freed memory, so no op's time includes page faults (as "
                        '`timm-hybrid compare --malloc keep`; default: %(default)s)')
    p.add_argument('--faults', action='store_true',
                   help='rank the ops by the minor page faults they take instead of their time (CPU only)')
    p.add_argument('--torch-profiler', action='store_true',
                   help='on CPU: time the ops under torch.profiler instead of at dispatch (slows large-map ops)')
    p.add_argument('--warmup', type=int, default=6,
                   help='steps before the profiled one (default: %(default)s; on CPU the first 3-4 training steps run '
                        'up to 1.3x slower while malloc\'s heap settles)')
    args = p.parse_args()

    on_gpu = torch.device(args.device).type == 'cuda'
    settings = SpeedSettings(
        device=args.device, threads=args.threads, amp=args.amp or ('bf16' if on_gpu else None),
        batch_size=args.batch_size or (256 if on_gpu else 32), malloc=args.malloc)
    if args.faults:
        table, meta = faults_step(args.model, settings, train=args.train, rows=args.rows, warmup=args.warmup)
    else:
        table, meta = profile_step(args.model, settings, train=args.train, rows=args.rows, warmup=args.warmup,
                                   torch_profiler=args.torch_profiler)
    out = args.output or (RESULTS / device_folder_name(settings) / 'profile' if on_gpu else RESULTS / 'profile')
    print(write_profile(args.model, args.train, table, meta, out, kind='faults' if args.faults else '').read_text())


if __name__ == '__main__':
    main()
