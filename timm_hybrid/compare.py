""" Matched-compute comparison: params, fvcore GMACs, CPU speed and memory of timm models, side by side.

The machine is shared and noisy, so speeds are measured interleaved (model order rotated every round), reported as
medians with their spread, and as ratios to reference models timed in the same run. This is what
`timm-hybrid compare` runs and what benchmarks/ scripts call.
"""
import csv
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ['Timing', 'time_interleaved', 'matmul_gmacs_per_s', 'peak_memory_mb', 'compare_models', 'resolution_sweep']

REFERENCES = ('tnt_s_patch16_224', 'deit_small_patch16_224')
# column suffixes of the speed ratios (infer_x_<short>, train_x_<short>); other references use the name up to '_patch'
_REFERENCE_SHORT_NAMES = {'tnt_s_patch16_224': 'tnt_s', 'deit_small_patch16_224': 'deit_s'}


def _short_name(name: str) -> str:
    return _REFERENCE_SHORT_NAMES.get(name, name.split('_patch')[0])


@dataclass
class Timing:
    """ Seconds per step over the repeats of one model. """
    seconds: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """ Half the inter-quartile range relative to the median (0.05 = +-5%). """
        if len(self.seconds) < 4:
            return (max(self.seconds) - min(self.seconds)) / 2 / self.median
        q1, _, q3 = statistics.quantiles(self.seconds, n=4)
        return (q3 - q1) / 2 / self.median


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, disable=None)


def _step_fn(model: nn.Module, x: torch.Tensor, train: bool) -> Callable[[], None]:
    if not train:
        model.eval()

        def infer():
            with torch.inference_mode():
                model(x)
        return infer

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.zeros(x.shape[0], dtype=torch.long)

    def train_step():
        out = model(x)
        loss = nn.functional.cross_entropy(out[0] if isinstance(out, tuple) else out, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # frees the gradients between steps
    return train_step


def time_interleaved(
        models: Dict[str, nn.Module],
        input_sizes: Dict[str, Tuple[int, int, int]],
        batch_size: int = 32,
        repeats: int = 5,
        train: bool = False,
        warmup: int = 1,
        desc: str = 'timing',
) -> Dict[str, Timing]:
    """ Times one step (inference, or forward + backward + AdamW step) of each model, rounds interleaved. """
    steps = {n: _step_fn(m, torch.randn(batch_size, *input_sizes[n]), train) for n, m in models.items()}
    names = list(models)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    timings = {n: Timing() for n in names}
    with _progress(repeats * len(names), desc) as bar:
        for r in range(repeats):
            for n in names[r % len(names):] + names[:r % len(names)]:  # rotate: no model always runs first
                start = time.perf_counter()
                steps[n]()
                timings[n].seconds.append(time.perf_counter() - start)
                bar.update()
    return timings


def matmul_gmacs_per_s(size: int = 2048, repeats: int = 5) -> float:
    """ Multiply-adds per second of a large float32 matmul: the practical peak of this CPU and thread count. """
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return size ** 3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_memory_mb(name: str, batch_size: int, train: bool, threads: int) -> float:
    """ Peak resident memory one step adds to the built model and its input (first step: activations, gradients,
    optimizer state, workspaces), in a fresh process. CPU tensors bypass Python's allocator tracing, so this reads the
    kernel's high-water mark (VmHWM), reset just before the step through /proc/self/clear_refs. """
    code = (
        'import json, torch, timm, timm_hybrid\n'
        'from timm_hybrid.compare import _step_fn\n'
        f'torch.set_num_threads({threads})\n'
        f'model = timm.create_model({name!r})\n'
        f'step = _step_fn(model, torch.randn({batch_size}, *model.pretrained_cfg["input_size"]), {train})\n'
        'kb = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])\n'
        'before = kb("VmRSS")\n'
        'open("/proc/self/clear_refs", "w").write("5")\n'
        'step()\n'
        'print(json.dumps((kb("VmHWM") - before) / 1024))\n'
    )
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _round_gmacs(gmacs: float) -> float:
    # three decimals for the 224 px models; the 28 px ones (~0.008 GMACs) keep three significant digits
    return round(gmacs, 3) if gmacs >= 0.1 else float(f'{gmacs:.3g}')


def _input_size(model: nn.Module) -> Tuple[int, int, int]:
    return tuple(model.pretrained_cfg['input_size'])


def compare_models(
        names: Sequence[str],
        output_dir: str = 'benchmarks/results/compare',
        quick: bool = True,
        speed: bool = True,
        threads: int = 2,
        batch_size: Optional[int] = None,
        references: Sequence[str] = REFERENCES,
        repeats: Optional[int] = None,
) -> List[Dict[str, object]]:
    """ Params, GMACs, inference / train-step img/s, peak memory and fraction of matmul peak, for each model.

    Speed ratios are to the `references` (TNT-S and DeiT-S by default; e.g. the 28 px baselines for the 28 px
    models), which are timed in the same interleaved rounds (added if not named).
    Writes compare.csv, compare.md, compare.json and compare.png to `output_dir`; prints the Markdown table.
    """
    import timm
    from .flops import count_flops
    torch.set_num_threads(threads)
    names = list(dict.fromkeys(names))
    references = list(dict.fromkeys(references))
    if speed and not references:
        raise ValueError('speed ratios need at least one reference model (references=[])')
    timed = names + [r for r in references if r not in names] if speed else names
    batch_size = batch_size or (8 if quick else 32)
    repeats = repeats or (3 if quick else 7)

    models = {n: timm.create_model(n) for n in timed}
    rows = {}
    for n in names:
        f = count_flops(models[n], input_size=_input_size(models[n]))
        rows[n] = dict(model=n, input=_input_size(models[n])[-1], params_m=round(f.mparams, 3),
                       gmacs=_round_gmacs(f.gmacs), train_gmacs=_round_gmacs(f.train_gmacs))
    meta = dict(threads=threads, batch_size=batch_size, repeats=repeats, quick=quick, references=references,
                torch=torch.__version__, timm=timm.__version__)
    if speed:
        sizes = {n: _input_size(m) for n, m in models.items()}
        peak = matmul_gmacs_per_s()
        meta['matmul_gmacs_per_s'] = round(peak, 1)
        infer = time_interleaved(models, sizes, batch_size, repeats, train=False, desc='inference')
        train = _time_train_in_groups(models, sizes, names, references, batch_size, max(2, repeats - 2))
        for n in names:
            row = rows[n]
            row['infer_img_s'] = round(batch_size / infer[n].median, 1)
            row['infer_spread'] = round(infer[n].spread, 3)
            row['train_img_s'] = round(batch_size / train[n][n].median, 1)
            row['train_spread'] = round(train[n][n].spread, 3)
            for ref in references:
                short = _short_name(ref)
                row[f'infer_x_{short}'] = round(infer[ref].median / infer[n].median, 3)
                row[f'train_x_{short}'] = round(train[n][ref].median / train[n][n].median, 3)
            row['frac_matmul_peak'] = round(row['gmacs'] * batch_size / infer[n].median / peak, 3)
        with _progress(len(names), 'peak memory') as bar:
            for n in names:
                rows[n]['train_peak_mb'] = round(peak_memory_mb(n, batch_size, True, threads), 0)
                bar.update()
    _write(list(rows.values()), meta, Path(output_dir), 'compare', reference=references[0] if speed else None)
    return list(rows.values())


def _time_train_in_groups(
        models: Dict[str, nn.Module],
        sizes: Dict[str, Tuple[int, int, int]],
        names: Sequence[str],
        references: Sequence[str],
        batch_size: int,
        repeats: int,
) -> Dict[str, Dict[str, Timing]]:
    """ Train steps of each model interleaved with the reference models only, one group at a time: optimizer state
    and activations of every model at once would not fit in memory (the B sizes at batch 32 exhaust 24 GB). Each
    model's ratio to a reference comes from its own group. """
    groups, timed = {}, {}
    for n in names:
        members = tuple(dict.fromkeys([n, *references]))
        if frozenset(members) not in timed:  # the references' own group is timed once
            timed[frozenset(members)] = time_interleaved(
                {m: models[m] for m in members}, sizes, batch_size, repeats, train=True, desc=f'train step {n}')
            gc.collect()
        groups[n] = timed[frozenset(members)]
    return groups


def resolution_sweep(
        names: Sequence[str],
        resolutions: Sequence[int] = (224, 288, 384, 448),
        output_dir: str = 'benchmarks/results/compare',
        threads: int = 2,
        batch_size: int = 8,
        repeats: int = 3,
) -> List[Dict[str, object]]:
    """ GMACs and inference time as the input grows: where attention's quadratic term takes over. """
    import timm
    from .flops import count_flops
    torch.set_num_threads(threads)
    rows = []
    for res in resolutions:
        models = {n: timm.create_model(n, img_size=res) for n in names}
        timing = time_interleaved(models, {n: (3, res, res) for n in names}, batch_size, repeats,
                                  desc=f'{res}px')
        for n in names:
            f = count_flops(models[n], input_size=(3, res, res))
            attention = f.by_operator.get('scaled_dot_product_attention', 0.) + f.by_operator.get('matmul', 0.)
            rows.append(dict(model=n, resolution=res, tokens=(res // 16) ** 2, gmacs=round(f.gmacs, 3),
                             attention_gmacs=round(attention, 3), infer_img_s=round(batch_size / timing[n].median, 2),
                             infer_spread=round(timing[n].spread, 3)))
    _write(rows, dict(threads=threads, batch_size=batch_size, repeats=repeats), Path(output_dir), 'resolution')
    return rows


def _markdown(rows: List[Dict[str, object]]) -> str:
    keys = list(rows[0])
    lines = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
    lines += ['| ' + ' | '.join(str(r.get(k, '')) for k in keys) + ' |' for r in rows]
    return '\n'.join(lines)


def _write(rows: List[Dict[str, object]], meta: Dict[str, object], out: Path, stem: str,
           reference: Optional[str] = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f'{stem}.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    command = 'timm-hybrid ' + ' '.join(sys.argv[1:]) if Path(sys.argv[0]).name == 'timm-hybrid' else \
        'python ' + ' '.join(sys.argv)
    table = _markdown(rows)
    settings = ', '.join(f'{k}={v}' for k, v in meta.items())
    (out / f'{stem}.md').write_text(f'Command: `{command}`\n\nSettings: {settings}\n\n{table}\n')
    (out / f'{stem}.json').write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f'\n{table}\n\n({settings}; written to {out}/{stem}.csv/.md/.json/.png)')
    _plot(rows, out / f'{stem}.png', stem, reference)


def _plot(rows: List[Dict[str, object]], path: Path, stem: str, reference: Optional[str] = None) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    if stem == 'resolution':
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name in dict.fromkeys(r['model'] for r in rows):
            mine = [r for r in rows if r['model'] == name]
            res = [r['resolution'] for r in mine]
            axes[0].plot(res, [r['gmacs'] for r in mine], 'o-', label=name)
            axes[1].plot(res, [r['infer_img_s'] for r in mine], 'o-', label=name)
        axes[0].set_ylabel('fvcore GMACs / image')
        axes[1].set_ylabel('inference img/s (CPU)')
        for ax in axes:
            ax.set_xlabel('input resolution (px)')
            ax.grid(alpha=.3)
            ax.legend(fontsize=8)
    else:
        has_speed = reference is not None and 'infer_img_s' in rows[0]
        fig, axes = plt.subplots(1, 2 if has_speed else 1, figsize=(12 if has_speed else 6, 4.5), squeeze=False)
        axes = axes[0]
        labels = [r['model'] for r in rows]
        axes[0].barh(labels, [r['gmacs'] for r in rows], color='tab:blue')
        axes[0].set_xlabel('fvcore GMACs / image (attention matmuls counted)')
        axes[0].invert_yaxis()
        if has_speed:
            y = range(len(rows))
            short = _short_name(reference)
            axes[1].barh([i - .2 for i in y], [r[f'infer_x_{short}'] for r in rows], height=.4, label='inference')
            axes[1].barh([i + .2 for i in y], [r[f'train_x_{short}'] for r in rows], height=.4, label='train step')
            axes[1].set_yticks(list(y), labels)
            axes[1].axvline(1, color='k', lw=.8)
            axes[1].set_xlabel(f'speed relative to {reference} (same interleaved run)')
            axes[1].invert_yaxis()
            axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
