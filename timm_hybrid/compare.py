""" Matched-compute comparison: params, fvcore GMACs, speed and memory of timm models, side by side.

A shared machine is noisy, so each model is timed interleaved with the reference models in one group of rounds
(order rotated every round), reported as the median with the spread over every repeat taken, and as ratios to the
references timed in the same rounds. Columns are named as timm's benchmark.py names them (`infer_samples_per_sec`,
`train_step_time`, `infer_gmacs`, `param_count`, ...). Progress goes to stderr as one plain line per model and stage,
and the tables are rewritten after every model, so an interrupted run leaves what it measured.

This is what `timm-hybrid compare` runs and what the benchmarks/ scripts call.
"""
import ast
import contextlib
import csv
import ctypes
import dataclasses
import gc
import json
import multiprocessing
import os
import platform
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple

try:
    import resource
except ImportError:  # Windows
    resource = None

import torch
import torch.nn as nn

import timm

from . import models as _families  # noqa: F401  registers our families, also in a spawned memory-measuring process
from .flops import count_flops

__all__ = [
    'REFERENCES', 'QUICK_MODELS', 'FULL_MODELS', 'SWEEP_MODELS', 'DEFAULT_OUTPUT', 'SpeedSettings', 'Timing',
    'Progress', 'ModelSpecError', 'parse_model_spec', 'create_model_spec', 'free_cpu_threads', 'make_step',
    'time_interleaved', 'matmul_gmacs_per_s', 'num_patch_tokens', 'processor_name', 'device_folder_name',
    'train_step_peak_memory_mb', 'peak_memory_mb', 'compare_models', 'resolution_sweep', 'markdown_table',
    'write_results', 'plot_speed_ratios', 'plot_resolution', 'plot_speed_vs_gmacs',
]

REFERENCES = ('tnt_s_patch16_224', 'deit_small_patch16_224')
# the default set: the matched S trio, a few minutes on 2 CPU cores; --full adds Ti and B and the hybrid families
QUICK_MODELS = ('cnt_s_patch16_224', 'tnt_s_patch16_224', 'deit_small_patch16_224')
FULL_MODELS = (
    'deit_tiny_patch16_224', 'tnt_ti_patch16_224', 'cnt_ti_patch16_224',
    'deit_small_patch16_224', 'tnt_s_patch16_224', 'cnt_s_patch16_224',
    'deit_base_patch16_224', 'tnt_b_patch16_224', 'cnt_b_patch16_224',
    'transcnn_small', 'hatnet_small', 'refiner_vit_small_patch16_224',
)
SWEEP_MODELS = QUICK_MODELS
# relative to the current folder, never inside the package: the committed benchmarks/results/ change only when a
# benchmark script is run on purpose
DEFAULT_OUTPUT = 'timm-hybrid-results/compare'
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
# 'default': glibc's malloc as a user's process has it; 'keep': `keep_freed_memory()`
MALLOC_SETTINGS = ('default', 'keep')

# column suffixes of the speed ratios (infer_x_<short>, train_x_<short>); other references use the name up to '_patch'
_REFERENCE_SHORT_NAMES = {'tnt_s_patch16_224': 'tnt_s', 'deit_small_patch16_224': 'deit_s'}


def reference_short_name(name: str) -> str:
    model, kwargs = parse_model_spec(name)
    short = _REFERENCE_SHORT_NAMES.get(model, model.split('_patch')[0])
    return short + ''.join(f'_{k}_{re.sub(r"[^0-9A-Za-z]+", "", str(v))}' for k, v in kwargs.items())


class ModelSpecError(ValueError):
    """ A model spec that does not parse, or whose kwargs the model does not take. """


def parse_model_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """ A model to time: a timm name, or `name:key=value,key=value` to build it with those kwargs (values read as
    Python literals, else taken as plain words), e.g. `cnt_ti_patch16_224:inner_impl=matmul,recompute_pixels=False`.
    The row keeps the whole spec as its `model`, so variants of one model are timed in the same rounds. """
    name, _, kwargs_text = spec.partition(':')
    kwargs = {}
    # split before each `key=`, so a value may hold commas: img_size=(32, 48)
    for item in re.split(r',\s*(?=[A-Za-z_]\w*\s*=)', kwargs_text) if kwargs_text else ():
        key, eq, text = item.partition('=')
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ModelSpecError(f"model spec {spec!r}: expected name:key=value[,key=value...], got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            kwargs[key] = text.strip()  # a plain word, e.g. inner_impl=matmul
    return name, kwargs


def create_model_spec(spec: str, **overrides) -> nn.Module:
    """ `timm.create_model` for a model spec (`parse_model_spec`); `overrides` win over the spec's kwargs. """
    name, kwargs = parse_model_spec(spec)
    dropped = [k for k, v in kwargs.items() if v is None]
    if dropped:  # the row would be labelled with a setting the model never got
        raise ModelSpecError(f'model spec {spec!r}: timm.create_model drops kwargs whose value is None '
                             f'({", ".join(dropped)}), so the model would be built with its defaults.')
    if not kwargs:
        return timm.create_model(name, **overrides)
    try:
        return timm.create_model(name, **{**kwargs, **overrides})
    except (TypeError, ValueError) as e:  # an unknown kwarg, or a value the model refuses
        raise ModelSpecError(f'model spec {spec!r}: {e}') from e


def free_cpu_threads() -> int:
    """ torch's thread count capped by the cores that other work leaves free (1-minute load average).

    Threads that wait for a busy core stall every op at its barrier: on the shared 2-core machine one model measured
    21.9 img/s with 2 threads and far more with 1 in the same minute, while its spread looked tight.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else 0.
    return max(1, min(torch.get_num_threads(), round(cores - load)))


@dataclass(frozen=True)
class SpeedSettings:
    """ How one step is timed; every output's settings line states all of it. """
    device: str = 'cpu'
    batch_size: int = 8
    repeats: int = 3
    threads: int = 1
    amp: Optional[str] = None  # None (float32), 'bf16' or 'fp16': torch.autocast, as timm's benchmark.py --amp
    compile: bool = False  # torch.compile (inductor)
    channels_last: bool = False
    warmup: int = 1
    # untimed steps of the same model right before each timed one: timm's benchmark.py times steps that follow steps
    # of the same model, and a step right after another model's finds the allocator's heap shaped by that model (CPU:
    # more page faults; in scratch A/B runs CNT-S / DeiT-S training ratios came out 0.03 lower without it)
    settle_steps: int = 1
    malloc: str = 'default'  # MALLOC_SETTINGS; 'keep': the models' own compute, without page faults (CPU, glibc)

    @classmethod
    def defaults(cls, full: bool = False, device: str = 'cpu', **overrides) -> 'SpeedSettings':
        """ Quick: batch 8, 3 repeats; full: batch 32, 7 repeats; on a GPU batch 256 as timm's benchmark.py.
        Threads: `free_cpu_threads()`. Overrides that are None keep the default. """
        on_gpu = torch.device(device).type == 'cuda'
        settings = dict(device=device, batch_size=256 if on_gpu else (32 if full else 8), repeats=7 if full else 3,
                        threads=free_cpu_threads())
        settings.update({k: v for k, v in overrides.items() if v is not None})
        if settings.get('compile'):
            settings.setdefault('warmup', 2)  # the first call compiles
        return cls(**settings)

    def __post_init__(self):
        if self.amp not in (None, *AMP_DTYPES):
            raise ValueError(f'amp must be one of {sorted(AMP_DTYPES)} or None, not {self.amp!r}')
        if self.repeats < 1 or self.batch_size < 1 or self.threads < 1:
            raise ValueError(f'batch_size, repeats and threads must be >= 1: {self}')
        if self.warmup < 0 or self.settle_steps < 0:
            raise ValueError(f'warmup and settle_steps must be >= 0: {self}')
        if torch.device(self.device).type == 'cuda' and not torch.cuda.is_available():
            raise ValueError(f'device {self.device!r} asked for, but torch sees no CUDA device')
        if self.malloc not in MALLOC_SETTINGS:
            raise ValueError(f'malloc must be one of {MALLOC_SETTINGS}, not {self.malloc!r}')
        if self.malloc == 'keep' and glibc_function('mallopt') is None:
            raise ValueError("malloc='keep' tunes glibc's malloc, and this C library is not glibc")

    @property
    def on_gpu(self) -> bool:
        return torch.device(self.device).type == 'cuda'

    def describe(self) -> str:
        return (f'device={self.device}, threads={self.threads}, batch_size={self.batch_size}, repeats={self.repeats} '
                f'(+{self.warmup} warm-up; {self.settle_steps} untimed step(s) of the same model before each timed '
                f'one), amp={self.amp or "off (float32)"}, compile={self.compile}, '
                f'channels_last={self.channels_last}, malloc={self.malloc}, torch {torch.__version__}, '
                f'timm {timm.__version__}')

    def apply_malloc(self) -> None:
        """ `keep_freed_memory()` where `malloc` is 'keep' (for the rest of the process); nothing otherwise. """
        if self.malloc == 'keep':
            keep_freed_memory()

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=AMP_DTYPES[self.amp])

    def synchronize(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize(self.device)


def processor_name(settings: SpeedSettings, cpuinfo: str = '/proc/cpuinfo') -> str:
    """ What ran the steps: the GPU's name, or the CPU's model name as Linux reports it in `cpuinfo`
    (`platform.processor()` elsewhere, 'unknown' if neither says) with the vector instructions aten's kernels use
    (e.g. AVX512). Ratios between models move with the host (README, "Measured on this CPU"), so every output names
    it. """
    if settings.on_gpu:
        return torch.cuda.get_device_name(settings.device)
    name = ''
    try:
        with open(cpuinfo) as f:
            name = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '')
    except OSError:
        pass
    return f'{name or platform.processor() or "unknown"} (aten: {torch.backends.cpu.get_cpu_capability()})'


def device_folder_name(settings: SpeedSettings) -> str:
    """ `cpu`, or on a GPU the GPU's name as a folder (e.g. `nvidia-h100-80gb-hbm3`). """
    if not settings.on_gpu:
        return 'cpu'
    return re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(settings.device).lower()).strip('-')


@dataclass
class Timing:
    """ Seconds per step over the repeats of one model, and the minor page faults the process took during each
    (fresh memory that the kernel maps in and zeroes: time that depends on the allocator as much as on the model). """
    seconds: List[float] = field(default_factory=list)
    faults: List[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_faults(self) -> int:
        return int(statistics.median(self.faults))

    @property
    def spread(self) -> float:
        """ Half the range over every repeat taken, relative to the median (0.05 = +-5%): a round slowed by other
        work shows here instead of being trimmed away. """
        return (max(self.seconds) - min(self.seconds)) / 2 / self.median


def _format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f'{minutes}m{seconds:02d}s'


class Progress:
    """ One plain line per finished stage on stderr, flushed, so a terminal and a piped log or CI see the same:
    elapsed time, the stage's result and an estimate of the rest.

    The estimate adds up the stages still planned, each priced at the seconds per unit measured so far for its kind
    (timing: GMACs x images; counting and memory: models), or at a first guess until one of its kind has run.
    """

    def __init__(self, stream: Optional[TextIO] = None):
        self.stream = stream
        self.start = time.perf_counter()
        self.planned: Dict[str, float] = {}
        self.done: Dict[str, float] = {}
        self.spent: Dict[str, float] = {}
        self.guess: Dict[str, float] = {}
        self._last_line = self.start

    def plan(self, kind: str, units: float, guess_seconds_per_unit: float) -> None:
        self.planned[kind] = self.planned.get(kind, 0.) + units
        self.guess.setdefault(kind, guess_seconds_per_unit)

    def remaining_seconds(self) -> float:
        total = 0.
        for kind, units in self.planned.items():
            done = self.done.get(kind, 0.)
            rate = self.spent[kind] / done if done else self.guess[kind]
            total += max(0., units - done) * rate
        return total

    def finished(self, kind: str, units: float, seconds: float, message: str, estimate: bool = True) -> None:
        """ A stage is done; `estimate=False` while later stages are not planned yet. """
        self.done[kind] = self.done.get(kind, 0.) + units
        self.spent[kind] = self.spent.get(kind, 0.) + seconds
        self.line(message, estimate=estimate)

    def line(self, message: str, estimate: bool = False) -> None:
        now = time.perf_counter()
        rest = f', ~{_format_seconds(self.remaining_seconds())} left' if estimate and self.planned else ''
        print(f'[{_format_seconds(now - self.start)}{rest}] {message}', file=self.stream or sys.stderr, flush=True)
        self._last_line = now

    def heartbeat(self, message: str, every: float = 20.) -> None:
        """ A line inside a long stage, at most every `every` seconds. """
        if time.perf_counter() - self._last_line >= every:
            self.line(message)


def prepare_model(model: nn.Module, settings: SpeedSettings) -> nn.Module:
    model = model.to(settings.device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if settings.compile else model


def make_step(
        model: nn.Module,
        input_size: Tuple[int, ...],
        settings: SpeedSettings,
        train: bool = False,
) -> Callable[[], None]:
    """ One inference step (inference_mode) or one training step (forward + cross-entropy + backward + AdamW step) of
    a batch of `settings.batch_size` random images on `settings.device`; it returns once the device is done. On a
    GPU it turns on `torch.backends.cudnn.benchmark`, as timm's benchmark.py does (process-wide): cuDNN then picks
    each convolution's fastest algorithm for its shapes during the warm-up steps. """
    if settings.on_gpu:
        torch.backends.cudnn.benchmark = True
    x = torch.randn(settings.batch_size, *input_size, device=settings.device)
    if settings.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    if not train:
        model.eval()

        def infer():
            with torch.inference_mode(), settings.autocast():
                model(x)
            settings.synchronize()
        return infer

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.zeros(settings.batch_size, dtype=torch.long, device=settings.device)

    def train_step():
        with settings.autocast():
            out = model(x)  # distilled models in training return (cls, dist) logits
            loss = nn.functional.cross_entropy(out[0] if isinstance(out, tuple) else out, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # frees the gradients between steps
        settings.synchronize()
    return train_step


def error_line(e: BaseException) -> str:
    """ 'ExceptionType: first line of its message' (at most 300 characters): what a table's `error` column holds. """
    return f'{type(e).__name__}: {e}'.splitlines()[0][:300]


def time_interleaved(
        models: Mapping[str, nn.Module],
        input_sizes: Mapping[str, Tuple[int, ...]],
        settings: SpeedSettings,
        train: bool = False,
        progress: Optional[Progress] = None,
        failures: Optional[Dict[str, str]] = None,
) -> Dict[str, Timing]:
    """ Times one step of each model, `settings.repeats` rounds after the warm-up, the order rotated every round so
    that no model always runs first; each timed step follows `settings.settle_steps` untimed ones of the same model.
    Models are prepared (device, channels-last, compile) by the caller.

    `failures`: where given, a model whose step raises (out of memory, a compile or kernel error) leaves the rounds,
    its error is recorded there as 'ExceptionType: message' and the others go on, as timm's benchmark.py records a
    model's `error` and goes on; the timings returned are those of the models that ran. Without it the error
    propagates. """
    torch.set_num_threads(settings.threads)
    settings.apply_malloc()
    steps = {n: make_step(m, input_sizes[n], settings, train) for n, m in models.items()}
    kind = 'train step' if train else 'inference'

    def run(n: str) -> bool:
        try:
            steps[n]()
            return True
        except Exception as e:
            if failures is None:
                raise
            failures[n] = error_line(e)
        # outside the handler, so that the exception's frames (and the step's tensors they hold) are gone first
        del steps[n]
        models[n].zero_grad(set_to_none=True)  # a step that failed mid-way may have left gradients
        if settings.on_gpu:
            torch.cuda.empty_cache()
        if progress is not None:
            progress.line(f'  {kind} {n} failed and leaves the rounds: {failures[n]}')
        return False

    for _ in range(settings.warmup):
        for n in list(steps):
            run(n)
    timings = {n: Timing() for n in steps}
    for r in range(settings.repeats):
        names = list(steps)
        if not names:  # every model failed
            break
        for n in names[r % len(names):] + names[:r % len(names)]:
            if not all(run(n) for _ in range(settings.settle_steps)):
                continue
            faults = minor_faults()
            start = time.perf_counter()
            if run(n):
                timings[n].seconds.append(time.perf_counter() - start)
                timings[n].faults.append(minor_faults() - faults)
        if progress is not None:
            progress.heartbeat(f'  {kind} round {r + 1}/{settings.repeats} of {", ".join(steps)}')
    return {n: t for n, t in timings.items() if n in steps}


def minor_faults() -> int:
    """ The minor page faults this process has taken so far (0 where `resource` is missing: Windows). """
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def matmul_gmacs_per_s(settings: SpeedSettings, size: int = 2048, repeats: int = 5) -> float:
    """ Multiply-adds per second of a large matmul on the device, thread count and AMP dtype of `settings`: the
    practical peak that `frac_matmul_peak` divides by. """
    torch.set_num_threads(settings.threads)
    dtype = AMP_DTYPES[settings.amp] if settings.amp else torch.float32
    a = torch.randn(size, size, device=settings.device, dtype=dtype)
    b = torch.randn(size, size, device=settings.device, dtype=dtype)
    best = float('inf')
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        a @ b
        settings.synchronize()
        best = min(best, time.perf_counter() - start)
    return size ** 3 / best / 1e9


def train_step_peak_memory_mb(name: str, settings: SpeedSettings) -> float:
    """ Peak memory one training step adds to the built model and its input (the first step: activations,
    gradients, optimizer state, workspaces), in MB. On CUDA `torch.cuda.max_memory_allocated`; on CPU tensors bypass
    Python's allocator tracing, so the kernel's high-water mark (VmHWM, Linux), reset just before the step through
    /proc/self/clear_refs. Memory already held by the process hides reuse, so run it in a fresh process:
    `peak_memory_mb`. A compiled model is measured eager: inductor's first step adds compile-time buffers. """
    torch.set_num_threads(settings.threads)
    settings.apply_malloc()
    eager = dataclasses.replace(settings, compile=False)
    model = prepare_model(create_model_spec(name), eager)
    step = make_step(model, tuple(model.pretrained_cfg['input_size']), eager, train=True)
    if eager.on_gpu:
        torch.cuda.synchronize(eager.device)
        before = torch.cuda.memory_allocated(eager.device)
        torch.cuda.reset_peak_memory_stats(eager.device)
        step()
        return (torch.cuda.max_memory_allocated(eager.device) - before) / 2 ** 20

    def status_kb(key: str) -> int:
        with open('/proc/self/status') as f:
            return int(next(line for line in f if line.startswith(key)).split()[1])

    if not os.path.exists('/proc/self/clear_refs'):
        return float('nan')
    before = status_kb('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM to the current RSS
    step()
    return (status_kb('VmHWM') - before) / 1024


def glibc_function(name: str) -> Optional[Callable[..., int]]:
    """ The glibc function `name` (e.g. `mallopt`, `malloc_trim`), or None where the C library is another. """
    try:
        return getattr(ctypes.CDLL('libc.so.6'), name)
    except (OSError, AttributeError):
        return None


# mallopt's parameters (malloc.h) and what 'keep' sets them to: mmap only above 256 MiB (glibc's default moves between
# 128 KiB and 32 MiB), and no trimming of the heap's top below 2 GiB (mallopt takes an int)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_MMAP_THRESHOLD, KEEP_TRIM_THRESHOLD = 256 * 2 ** 20, 2 ** 31 - 1


def keep_freed_memory() -> None:
    """ Tells glibc's malloc to keep the memory that freed tensors leave, for the rest of the process, as
    `MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=2147483647` would at its start.

    By default glibc serves a block above its mmap threshold (at most 32 MiB) with a fresh mmap, and hands the top of
    its heap back to the OS once enough of it is free; either way the next step's tensors are page-faulted in and
    zeroed by the kernel anew. How many faults a step takes then depends on where the heap's top falls, which differs
    between models and between runs: Refiner-S's CPU training step ran at 0.284x DeiT-S's with glibc's defaults and
    0.332x with this, and CNT-Ti's inference at 1.132x DeiT-Ti's and 0.826x, as DeiT-Ti's eval forward faults and
    CNT-Ti's does not (benchmarks/results/compare_malloc, README "Measured on this CPU"). With it a step reuses pages
    the steps before it faulted in, so the timings measure the models' own compute; without it (the default) they
    measure what a user's process gets.
    """
    mallopt = glibc_function('mallopt')
    if mallopt is None or not (mallopt(_M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD)
                               and mallopt(_M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)):
        raise RuntimeError("glibc's mallopt refused to keep freed memory (or this C library is not glibc)")


def release_freed_memory() -> None:
    """ Hands the memory that freed tensors left in this process's heap back to the OS (glibc's `malloc_trim`; a
    no-op elsewhere), collecting Python's garbage first. """
    gc.collect()
    malloc_trim = glibc_function('malloc_trim')
    if malloc_trim is not None:
        malloc_trim(0)


def peak_memory_mb(name: str, settings: SpeedSettings) -> float:
    """ `train_step_peak_memory_mb` in a fresh process (spawned: no CUDA context or allocator cache inherited). """
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:
        return pool.submit(train_step_peak_memory_mb, name, settings).result()


def num_patch_tokens(model: nn.Module) -> Optional[int]:
    """ Patch tokens the model attends over at its built size (timm's ViT / DeiT: `patch_embed.num_patches`; TNT,
    CNT: `num_patches`); None for hierarchical models that have no single token grid. """
    for owner in (model, getattr(model, 'patch_embed', None)):
        tokens = getattr(owner, 'num_patches', None)
        if tokens:
            return int(tokens)
    return None


def _round_gmacs(gmacs: float) -> float:
    # three decimals for the 224 px models; the 28 px ones (~0.008 GMACs) keep three significant digits
    return round(gmacs, 3) if gmacs >= 0.1 else float(f'{gmacs:.3g}')


def _input_size(model: nn.Module) -> Tuple[int, ...]:
    return tuple(model.pretrained_cfg['input_size'])


def _timing_groups(names: Sequence[str], references: Sequence[str]) -> List[List[str]]:
    """ Each model with the references, a model timed once: every ratio comes from rounds the model and the
    reference shared, and at most one model beyond the references holds activations and optimizer state at a time
    (the B sizes at batch 32 exhaust 24 GB all together). """
    groups, covered = [], set()
    for n in names:
        if n not in covered:
            groups.append(list(dict.fromkeys([n, *references])))
            covered.update(groups[-1])
    return groups


def _count(
        counted: Sequence[str],
        reported: Sequence[str],
        progress: Progress,
        estimate: bool,
) -> Tuple[Dict[str, Dict[str, object]], Dict[str, float]]:
    """ Params and GMACs: the rows of the `reported` models, and the GMACs of every `counted` one. """
    rows, gmacs = {}, {}
    progress.plan('count', len(counted), 5.)
    for n in counted:
        start = time.perf_counter()
        model = create_model_spec(n)
        f = count_flops(model, input_size=_input_size(model))
        gmacs[n] = f.gmacs
        if n in reported:
            rows[n] = dict(model=n, infer_img_size=_input_size(model)[-1], param_count=round(f.mparams, 3),
                           infer_gmacs=_round_gmacs(f.gmacs))
        progress.finished('count', 1, time.perf_counter() - start,
                          f'{n}: {f.mparams:.2f} M params, {_round_gmacs(f.gmacs)} GMACs', estimate=estimate)
    return rows, gmacs


def _speed_columns(
        name: str,
        infer: Mapping[str, Timing],
        train: Mapping[str, Timing],
        references: Sequence[str],
        settings: SpeedSettings,
) -> Dict[str, float]:
    """ timm's benchmark.py columns (samples/s, step time in ms) + the spread and the ratios to the references; on
    CPU the median minor page faults of a timed step (`<prefix>_faults_per_step`): where a model and its reference
    fault in different amounts, their ratio holds the allocator's work as well as theirs (`--malloc keep`). """
    columns = {}
    for prefix, timings in (('infer', infer), ('train', train)):
        t = timings.get(name)
        if t is None:  # the model failed (time_interleaved's failures)
            continue
        columns[f'{prefix}_samples_per_sec'] = round(settings.batch_size / t.median, 2)
        columns[f'{prefix}_step_time'] = round(1000 * t.median, 3)
        columns[f'{prefix}_spread'] = round(t.spread, 3)
        for ref in references:
            if ref in timings:
                columns[f'{prefix}_x_{reference_short_name(ref)}'] = round(timings[ref].median / t.median, 3)
        if not settings.on_gpu and t.faults:
            columns[f'{prefix}_faults_per_step'] = t.median_faults
    return columns


def compare_models(
        names: Sequence[str] = QUICK_MODELS,
        output_dir: str = DEFAULT_OUTPUT,
        settings: Optional[SpeedSettings] = None,
        speed: bool = True,
        references: Sequence[str] = REFERENCES,
        memory: bool = True,
        progress: Optional[Progress] = None,
        stem: str = 'compare',
) -> List[Dict[str, object]]:
    """ Params, GMACs, inference / train-step samples/s, ratios to the references, fraction of matmul peak and
    training peak memory, for each model. Models (and references) are timm names or model specs with kwargs
    (`parse_model_spec`: `cnt_ti_patch16_224:inner_impl=matmul`).

    The `references` (TNT-S and DeiT-S by default; e.g. the 28 px baselines for the 28 px models) are timed in the
    same interleaved rounds as each model (added if not named) and reported only if named. `<stem>.csv/.md/.json` in
    `output_dir` are rewritten after each model; `<stem>.png` at the end.
    """
    settings = settings or SpeedSettings.defaults()
    progress = progress or Progress()
    names = list(dict.fromkeys(names))
    references = list(dict.fromkeys(references))
    if speed and not references:
        raise ValueError('speed ratios need at least one reference model (references=[])')
    out = Path(output_dir)
    groups = _timing_groups(names, references) if speed else []
    meta = dict(settings=settings.describe() if speed else 'params and GMACs only', references=references)
    progress.line(f'models: {len(names)}{f", timing groups: {len(groups)}" if speed else ""}; '
                  f'{meta["settings"]}; writing to {out.resolve()}')

    counted = list(dict.fromkeys([*names, *(m for g in groups for m in g)]))  # references' GMACs price the estimate
    rows, gmacs = _count(counted, names, progress, estimate=not speed)

    def save():
        write_results(list(rows.values()), out, stem, meta)
    save()
    if not speed:
        return list(rows.values())

    meta['processor'] = processor_name(settings)
    peak = matmul_gmacs_per_s(settings)
    meta['matmul_gmacs_per_s'] = round(peak, 1)
    # first guesses until measured: a step runs at ~1/3 of matmul peak, a training step costs 3 forwards; a memory
    # measurement (a fresh process importing torch and timm, one step) ~10 s
    steps_run = settings.repeats * (1 + settings.settle_steps) + settings.warmup
    work = {i: sum(gmacs[m] for m in g) * settings.batch_size * steps_run
            for i, g in enumerate(groups)}
    progress.plan('inference', sum(work.values()), 3 / peak)
    progress.plan('train step', 3 * sum(work.values()), 3 / peak)
    if memory:
        progress.plan('memory', len(names), 10.)

    built: Dict[str, nn.Module] = {}
    sizes: Dict[str, Tuple[int, ...]] = {}
    for i, group in enumerate(groups):
        for m in group:
            if m not in built:
                model = create_model_spec(m)
                sizes[m] = _input_size(model)
                built[m] = prepare_model(model, settings)
        timings, failures = {}, {}
        for kind, train, units in (('inference', False, work[i]), ('train step', True, 3 * work[i])):
            start = time.perf_counter()
            failures[kind] = {}
            timings[kind] = time_interleaved(
                {m: built[m] for m in group}, sizes, settings, train, progress, failures=failures[kind])
            progress.finished(kind, units, time.perf_counter() - start, f'{kind}, group {i + 1}/{len(groups)} done')
            for m, t in timings[kind].items():
                faults = '' if settings.on_gpu else f', {t.median_faults} page faults/step'
                progress.line(f'  {kind} {m}: {settings.batch_size / t.median:.1f} samples/s ±{t.spread:.0%}, '
                              f'{t.median * 1000:.0f} ms/step{faults}')
        new = [m for m in group if m in rows and 'infer_samples_per_sec' not in rows[m] and 'error' not in rows[m]]
        for m in new:
            rows[m].update(_speed_columns(m, timings['inference'], timings['train step'], references, settings))
            if 'infer_samples_per_sec' in rows[m]:
                rows[m]['frac_matmul_peak'] = round(gmacs[m] * rows[m]['infer_samples_per_sec'] / peak, 3)
            # timm's benchmark.py column for a model that failed; a reference's failure leaves its ratios out
            errors = [f'{kind}: {failures[kind][m]}' for kind in failures if m in failures[kind]]
            if errors:
                rows[m]['error'] = '; '.join(errors)
        save()
        for m in group:  # keep the references for the next groups, free the rest
            if m not in references:
                del built[m]
        del timings
        # before the memory process starts: Refiner-S's training step holds ~11 GB, and this process's heap still
        # holds what its timed steps left (malloc keeps freed chunk-sized blocks); together they overran 24 GB
        release_freed_memory()
        for m in new if memory else ():
            if 'train_samples_per_sec' not in rows[m]:  # its training step failed in this process already
                continue
            start = time.perf_counter()
            try:
                rows[m]['train_peak_mem_mb'] = round(peak_memory_mb(m, settings), 0)
                done = f'{m}: train step peak memory {rows[m]["train_peak_mem_mb"]:.0f} MB'
            except Exception as e:  # the spawned process's error (out of memory, say): the timings stand
                error = f'memory: {error_line(e)}'
                rows[m]['error'] = '; '.join(filter(None, [rows[m].get('error'), error]))
                done = f'{m}: train step peak memory failed: {error}'
            progress.finished('memory', 1, time.perf_counter() - start, done)
            save()

    plot_speed_ratios(list(rows.values()), out / f'{stem}.png', references[0], settings)
    return list(rows.values())


def resolution_sweep(
        names: Sequence[str] = SWEEP_MODELS,
        resolutions: Sequence[int] = (224, 288, 384, 448),
        output_dir: str = DEFAULT_OUTPUT,
        settings: Optional[SpeedSettings] = None,
        progress: Optional[Progress] = None,
) -> List[Dict[str, object]]:
    """ GMACs and inference time as the input grows: where attention's quadratic term takes over. Writes
    resolution.csv/.md/.json after each resolution, resolution.png at the end. """
    settings = settings or SpeedSettings.defaults()
    progress = progress or Progress()
    out = Path(output_dir)
    meta = dict(settings=settings.describe())
    progress.plan('sweep', len(resolutions), 60.)
    rows = []
    for res in resolutions:
        start = time.perf_counter()
        built = {n: create_model_spec(n, img_size=res) for n in names}
        prepared = {n: prepare_model(m, settings) for n, m in built.items()}
        sizes = {n: (_input_size(m)[0], res, res) for n, m in built.items()}
        timing = time_interleaved(prepared, sizes, settings, progress=progress)
        for n, model in built.items():
            f = count_flops(model, input_size=sizes[n])
            attention = f.by_operator.get('scaled_dot_product_attention', 0.) + f.by_operator.get('matmul', 0.)
            rows.append(dict(model=n, infer_img_size=res, tokens=num_patch_tokens(model), infer_gmacs=round(f.gmacs, 3),
                             attention_gmacs=round(attention, 3),
                             infer_samples_per_sec=round(settings.batch_size / timing[n].median, 2),
                             infer_spread=round(timing[n].spread, 3)))
        write_results(rows, out, 'resolution', meta)
        progress.finished('sweep', 1, time.perf_counter() - start, f'{res} px: ' + ', '.join(
            f'{r["model"]} {r["infer_samples_per_sec"]}/s' for r in rows[-len(names):]))
    plot_resolution(rows, out / 'resolution.png', settings)
    return rows


def markdown_table(rows: Sequence[Mapping[str, object]]) -> str:
    """ A Markdown table of the rows; columns are the union of their keys in order of appearance. """
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
    lines += ['| ' + ' | '.join(str(r.get(k, '')) for k in keys) + ' |' for r in rows]
    return '\n'.join(lines)


def _command_line() -> str:
    if Path(sys.argv[0]).name.split('.')[0] == 'timm-hybrid':
        return 'timm-hybrid ' + ' '.join(sys.argv[1:])
    return 'python ' + ' '.join(sys.argv)


def write_results(
        rows: Sequence[Mapping[str, object]],
        output_dir: os.PathLike,
        stem: str,
        meta: Optional[Mapping[str, object]] = None,
        title: Optional[str] = None,
) -> Path:
    """ The one writer of result tables: `<stem>.csv`, `<stem>.md` (title, command, settings, table) and `<stem>.json`
    (meta + rows) in `output_dir`. Columns are the union of the rows' keys; a row without a value leaves it empty
    (a table rewritten while models are still being measured). Returns `output_dir / stem` (no suffix). """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / f'{stem}.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    header = [f'# {title}\n'] if title else []
    header.append(f'Command: `{_command_line()}`\n')
    header += [f'{k.capitalize() if k == "settings" else k}: {v}\n' for k, v in meta.items()]
    (out / f'{stem}.md').write_text('\n'.join(header) + '\n' + markdown_table(rows) + '\n')
    (out / f'{stem}.json').write_text(json.dumps(dict(meta=meta, rows=list(rows)), indent=1) + '\n')
    return out / stem


def _settings_caption(settings: Optional[SpeedSettings]) -> str:
    if settings is None:
        return ''
    return (f'{settings.device}, threads {settings.threads}, batch {settings.batch_size}, repeats {settings.repeats}, '
            f'amp {settings.amp or "off"}{", compiled" if settings.compile else ""}')


def _figure(ncols: int = 1, width: float = 6.):
    try:
        import matplotlib
    except ImportError as e:  # an optional dependency: the tables are written before any plot
        raise ImportError("the plots need matplotlib: pip install 'timm-hybrid[bench]'") from e
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 4.5), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path: Path, settings: Optional[SpeedSettings]) -> None:
    if settings is not None:
        fig.suptitle(_settings_caption(settings), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speed_ratios(rows: Sequence[Mapping[str, object]], path: Path, reference: str,
                      settings: Optional[SpeedSettings] = None) -> None:
    """ GMACs per image, and inference / train-step speed relative to `reference`, one bar per model. """
    short = reference_short_name(reference)
    timed = [r for r in rows if f'infer_x_{short}' in r]
    plt, fig, axes = _figure(2 if timed else 1)
    labels = [r['model'] for r in rows]
    axes[0].barh(labels, [r['infer_gmacs'] for r in rows], color='tab:blue')
    axes[0].set_xlabel('fvcore GMACs / image (attention matmuls counted)')
    axes[0].invert_yaxis()
    if timed:
        y = range(len(timed))
        # a ratio that is missing (the training step failed) draws no bar
        axes[1].barh([i - .2 for i in y], [r[f'infer_x_{short}'] for r in timed], height=.4, label='inference')
        axes[1].barh([i + .2 for i in y], [r.get(f'train_x_{short}', float('nan')) for r in timed], height=.4,
                     label='train step')
        axes[1].set_yticks(list(y), [r['model'] for r in timed])
        axes[1].axvline(1, color='k', lw=.8)
        axes[1].set_xlabel(f'speed x {reference} (same rounds)')
        axes[1].invert_yaxis()
        axes[1].legend()
    _save(plt, fig, path, settings)


def plot_resolution(rows: Sequence[Mapping[str, object]], path: Path,
                    settings: Optional[SpeedSettings] = None) -> None:
    """ GMACs and inference samples/s against input resolution, one line per model. """
    plt, fig, axes = _figure(2, 5.)
    for name in dict.fromkeys(r['model'] for r in rows):
        mine = [r for r in rows if r['model'] == name]
        res = [r['infer_img_size'] for r in mine]
        axes[0].plot(res, [r['infer_gmacs'] for r in mine], 'o-', label=name)
        axes[1].plot(res, [r['infer_samples_per_sec'] for r in mine], 'o-', label=name)
    axes[0].set_ylabel('fvcore GMACs / image')
    axes[1].set_ylabel('inference samples/s')
    for ax in axes:
        ax.set_xlabel('input resolution (px)')
        ax.grid(alpha=.3)
        ax.legend(fontsize=8)
    _save(plt, fig, path, settings)


def plot_speed_vs_gmacs(rows: Sequence[Mapping[str, object]], path: Path,
                        settings: Optional[SpeedSettings] = None) -> None:
    """ Inference and train-step samples/s against GMACs per image, one labelled point per model: a model above the
    line through another does more per GMAC. """
    plt, fig, axes = _figure(2, 5.5)
    for ax, prefix in zip(axes, ('infer', 'train')):
        for r in rows:
            if f'{prefix}_samples_per_sec' in r:
                ax.scatter(r['infer_gmacs'], r[f'{prefix}_samples_per_sec'])
                ax.annotate(r['model'], (r['infer_gmacs'], r[f'{prefix}_samples_per_sec']), fontsize=7,
                            xytext=(3, 3), textcoords='offset points')
        ax.set_xscale('log')
        ax.set_yscale('log')
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_formatter(plt.NullFormatter())  # labels on a narrow log range overlap
        ax.set_xlabel('fvcore GMACs / image')
        ax.set_ylabel(f'{"inference" if prefix == "infer" else "train step"} samples/s')
        ax.grid(alpha=.3, which='both')
    _save(plt, fig, path, settings)
