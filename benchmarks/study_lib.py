""" What the Fashion-MNIST studies share: run specs, launching timm's train.py / validate.py resumably, reading their
outputs, runs.csv, and the tables and plots drawn from it.

A study is a list of `Run`s in the order they are worth having. `run_queue` trains them one after another (or
`parallel` side by side); a run stopped at any point continues from its last checkpoint (train.py `--resume`) the
next time the queue reaches it, and a run already in runs.csv is skipped, so a study spans sessions. Nothing here
calls git: the results folder is committed by hand.
"""
import csv
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]

# train.py's progress line; the parenthesised figures are the running averages over the epoch so far
TRAIN_LOG_LINE = re.compile(r'^Train: (\d+) \[\s*(\d+)/(\d+) .*\(\s*[\d.]+s,\s*([\d.]+)/s\)')


@dataclass(frozen=True)
class Run:
    """ One training run: train.py's command is `recipe` + these fields. """
    name: str
    group: str
    model: str
    data: str  # a key of the study's data layouts
    seed: int = 0
    epochs: int = 1
    val_interval: int = 1
    model_kwargs: Tuple[str, ...] = ()
    distill: str = ''  # '', 'hard' or 'soft' (timm's token distillation from the study's teacher)
    extra_args: Tuple[str, ...] = ()  # recipe overrides (e.g. a recipe-check learning rate)


@dataclass
class Study:
    """ Where a study keeps its runs (work dir, outside the repository) and results (in benchmarks/results/). """
    results: Path
    work: Path
    recipe: str
    fields: Tuple[str, ...]
    data_root: Callable[[str, str], Path]  # (data key, 'validation' | 'test') -> the folder to pass as --data-dir
    teacher_dir: Optional[Path] = None
    train_images: Dict[str, int] = field(default_factory=dict)

    @property
    def runs_csv(self) -> Path:
        return self.results / 'runs.csv'

    @property
    def curves(self) -> Path:
        return self.results / 'curves'

    def run_dir(self, run: Run) -> Path:
        return self.work / run.name

    @property
    def weights(self) -> Path:
        """ Finished runs' final weights (`keep_final_weights`): what `.fmnist` tags are later published from. """
        return self.results / 'weights'

    def weights_file(self, run_name: str) -> Path:
        """ The kept final weights of run `run_name` (written by `keep_final_weights`, read by the publishers). """
        return self.weights / f'{run_name}.safetensors'

    @property
    def carried(self) -> Path:
        """ Unfinished runs' last checkpoints, kept with the results (`carry_unfinished`): a machine's work dir does
        not outlive its session, and a distillation run takes longer than one. """
        return self.results / 'unfinished'


def train_command(study: Study, run: Run, train_py: Path, eval_split: str = 'validation') -> List[str]:
    cmd = [sys.executable, str(train_py), *shlex.split(study.recipe), *run.extra_args,
           '--data-dir', str(study.data_root(run.data, eval_split)), '--model', run.model,
           '--epochs', str(run.epochs), '--seed', str(run.seed), '--output', str(study.work), '--experiment', run.name]
    if run.val_interval != 1:
        cmd += ['--val-interval', str(run.val_interval)]
    if run.model_kwargs:
        cmd += ['--model-kwargs', *run.model_kwargs]
    if run.distill:
        cmd += ['--kd-model-name', f'local-dir:{study.teacher_dir}', '--kd-distill-type', 'token',
                '--kd-token-distill-type', run.distill]
    return cmd


def shown_command(command: Sequence[str], scripts: Optional[Path] = None) -> str:
    """ A command as it is typed: `python ...`, repository paths relative, timm's scripts (in `scripts`) by name,
    without a session's --resume. """
    args = list(command[1:])
    if '--resume' in args:
        i = args.index('--resume')
        del args[i:i + 2]
    shown = shlex.join(['python', *args]).replace(str(REPO) + '/', '')
    return shown.replace(str(scripts) + '/', '') if scripts else shown


def read_summary(path: Path) -> List[Dict[str, str]]:
    """ train.py's per-epoch summary.csv (a resumed run may repeat the header or an epoch: last one wins). """
    if not path.exists():
        return []
    by_epoch = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get('epoch', 'epoch') != 'epoch':
                by_epoch[int(row['epoch'])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def epochs_done(study: Study, run: Run) -> int:
    """ Epochs finished and checkpointed (train.py writes summary.csv and checkpoints only on evaluated epochs). """
    summary = read_summary(study.run_dir(run) / 'summary.csv')
    return int(summary[-1]['epoch']) + 1 if summary else 0


def train_images_per_second(log: Path) -> Optional[float]:
    """ Training throughput without evaluation and checkpointing: the median over epochs of train.py's epoch-average
    images/s (its last progress line of each epoch; a resumed epoch's later line wins). Only comparable between runs
    that had the machine to themselves; the time columns of the reports use `timm-hybrid compare` instead. """
    if not log.exists():
        return None
    per_epoch = {}
    for line in log.read_text(errors='replace').splitlines():
        match = TRAIN_LOG_LINE.match(line)
        if match and int(match.group(2)) + 1 == int(match.group(3)):
            per_epoch[int(match.group(1))] = float(match.group(4))
    return round(statistics.median(per_epoch.values()), 1) if per_epoch else None


def read_rows(path: Path) -> List[Dict[str, str]]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def recorded_runs(study: Study) -> Dict[str, Dict[str, str]]:
    return {row['run']: row for row in read_rows(study.runs_csv)}


def append_row(path: Path, fields: Sequence[str], row: Dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists()
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new_file:
            writer.writeheader()
        writer.writerow(row)


def write_rows(path: Path, rows: Sequence[Dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_curve(study: Study, run: Run) -> List[Dict[str, str]]:
    """ Keeps the run's per-epoch metrics with the results (train.py's summary.csv lives in the work dir). """
    rows = read_summary(study.run_dir(run) / 'summary.csv')
    write_rows(study.curves / f'{run.name}.csv', rows)
    return rows


def read_curve(study: Study, run_name: str, metric: str = 'eval_top1') -> List[Tuple[int, float]]:
    """ (epochs done, metric) of every evaluated epoch of a recorded run. """
    return [(int(r['epoch']) + 1, float(r[metric])) for r in read_rows(study.curves / f'{run_name}.csv')]


def change_over_last_tenth(curve: Sequence[Tuple[int, float]]) -> Optional[float]:
    """ How much the metric moved over the last 10% of epochs: final value minus the value at the last evaluated
    epoch at or before 90% of the run (the flatness check of a schedule). """
    if len(curve) < 2:
        return None
    last_epoch, last = curve[-1]
    before = [v for e, v in curve if e <= math.floor(0.9 * last_epoch)]
    return round(last - before[-1], 2) if before else None


def seconds_to_reach(curve: Sequence[Tuple[int, float]], target: float, sec_per_epoch: float) -> Optional[float]:
    """ Training seconds until the curve first reaches `target` (None if it never does). """
    for epoch, value in curve:
        if value >= target:
            return epoch * sec_per_epoch
    return None


THROUGHPUT_COLUMNS = ('train_samples_per_sec', 'train_img_s')  # compare's column, as timm's benchmark.py; older CSVs


def train_throughput(compare_csv: Path) -> Dict[str, float]:
    """ Training images/s per model from a `timm-hybrid compare` CSV: the speeds that turn epochs into seconds,
    measured side by side on the final code, so runs made before a speed-up stay comparable. """
    speeds = {}
    for row in read_rows(compare_csv):
        value = next((row[c] for c in THROUGHPUT_COLUMNS if row.get(c)), None)
        if value is not None:
            speeds[row['model']] = float(value)
    return speeds


def mean_std(values: Sequence[float]) -> str:
    """ 'mean ± std (n=k)', std the sample standard deviation over seeds. """
    if not values:
        return '-'
    if len(values) == 1:
        return f'{values[0]:.2f} (n=1)'
    return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})'


def plot_bands(
        path: Path,
        panels: Sequence[Tuple[str, Dict[str, List[List[Tuple[float, float]]]]]],
        xlabel: str,
        ylabel: str,
        title: str = '',
) -> None:
    """ One panel per (title, {label: [curve of each seed]}): the mean over seeds as a line and the seeds' range as a
    band (curves are taken at the x values the seeds share). """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (panel_title, series) in zip(axes[0], panels):
        for label, curves in series.items():
            shared = sorted(set.intersection(*(set(x for x, _ in c) for c in curves)))
            if not shared:
                continue
            ys = [[dict(c)[x] for x in shared] for c in curves]
            mean = [statistics.mean(v) for v in zip(*ys)]
            line, = ax.plot(shared, mean, lw=1.4, label=f'{label} (n={len(curves)})')
            if len(curves) > 1:
                ax.fill_between(shared, [min(v) for v in zip(*ys)], [max(v) for v in zip(*ys)],
                                color=line.get_color(), alpha=.2, lw=0)
        ax.set_title(panel_title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- launching -------------------------------------------------------------------------------------------------------

def _log(message: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {message}', flush=True)


# what a carried run needs to resume as if it had not moved: the checkpoint, the curve so far, the log
CARRIED_FILES = ('last.pth.tar', 'summary.csv', 'log.txt', 'args.yaml')


def _copy_run_files(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in CARRIED_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)


def carry_unfinished(study: Study, runs: Sequence[Run]) -> List[str]:
    """ Copies the work dir's unfinished runs (a checkpoint, not yet in runs.csv) into `study.carried`, replacing an
    older copy if the work dir's is further on; drops the copies of runs recorded since. Returns the runs carried. """
    done = recorded_runs(study)
    carried = []
    for run in runs:
        keep = study.carried / run.name
        if run.name in done:
            shutil.rmtree(keep, ignore_errors=True)
            continue
        source = study.run_dir(run)
        if not (source / 'last.pth.tar').exists():
            continue
        kept, here = read_summary(keep / 'summary.csv'), read_summary(source / 'summary.csv')
        if kept and (not here or int(kept[-1]['epoch']) >= int(here[-1]['epoch'])):
            continue  # the kept copy is as far on (this machine resumed from it and has not gone further)
        _copy_run_files(source, keep)
        carried.append(run.name)
    return carried


def keep_final_weights(study: Study, run: Run) -> Optional[Path]:
    """ The model weights of a finished run's last checkpoint (the one its test top-1 was measured on), fp32, as
    `study.weights/<run>.safetensors`; None if the work dir holds no checkpoint of it (another machine trained it). """
    from safetensors.torch import save_file
    from timm_hybrid.hub import read_checkpoint
    checkpoint = study.run_dir(run) / 'last.pth.tar'
    if not checkpoint.exists():
        return None
    study.weights.mkdir(parents=True, exist_ok=True)
    target = study.weights_file(run.name)
    save_file({k: v.contiguous() for k, v in read_checkpoint(checkpoint).items()}, str(target),
              metadata={'run': run.name, 'model': run.model, 'model_kwargs': ' '.join(run.model_kwargs)})
    return target


def restore_carried(study: Study, run: Run) -> None:
    """ A run carried from another machine continues from its kept checkpoint where this work dir has none. """
    keep, target = study.carried / run.name, study.run_dir(run)
    if (keep / 'last.pth.tar').exists() and not (target / 'last.pth.tar').exists():
        _copy_run_files(keep, target)
        _log(f'{run.name}: restored the carried checkpoint (epoch {epochs_done(study, run)})')


def train(study: Study, run: Run, train_py: Path, threads: int) -> Tuple[int, List[str]]:
    """ Trains `run` to its last epoch in the foreground, resuming from its last checkpoint if there is one (in the
    work dir, else a carried one). Returns train.py's exit code and the command (without --resume). """
    command = train_command(study, run, train_py)
    restore_carried(study, run)
    last = study.run_dir(run) / 'last.pth.tar'
    if epochs_done(study, run) >= run.epochs:
        return 0, command
    study.run_dir(run).mkdir(parents=True, exist_ok=True)
    _log(f'train {run.name}' + (f' (resumed at epoch {epochs_done(study, run)})' if last.exists() else ''))
    with open(study.run_dir(run) / 'log.txt', 'a') as log:
        proc = subprocess.Popen(command + (['--resume', str(last)] if last.exists() else []), stdout=log,
                                stderr=subprocess.STDOUT, env=thread_env(threads), cwd=study.work)
        try:
            return proc.wait(), command
        finally:  # the queue stopped (Ctrl-C, SIGTERM): stop its training process too; it resumes next time
            if proc.poll() is None:
                proc.terminate()
                proc.wait()


def export_teacher(study: Study, model: str, checkpoint: Path, dtype: Optional[str] = None,
                   card_data: Optional[Dict[str, object]] = None) -> None:
    """ A trained teacher checkpoint as the local-dir folder train.py's --kd-model-name reads (study.teacher_dir).
    The Fashion-MNIST data settings go into its config.json: train.py's distillation re-normalises the student's
    input with the teacher's mean / std. With `dtype` (e.g. 'float16') the float weights are stored in it: a folder
    small enough to commit, so distillation runs need no teacher training first; timm loads it into an fp32 model.
    `card_data` goes to the model card (`timm_hybrid.hub.render_model_card`). """
    from timm_hybrid.data import (
        FASHION_MNIST_INPUT_SIZE, FASHION_MNIST_MEAN, FASHION_MNIST_NUM_CLASSES, FASHION_MNIST_STD,
    )
    import torch
    from timm_hybrid.hub import export, read_checkpoint
    if dtype is not None:
        state_dict = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v
                      for k, v in read_checkpoint(checkpoint).items()}
        checkpoint = study.work / f'teacher-{dtype}.pth'
        torch.save(state_dict, checkpoint)
    export(model, checkpoint, study.teacher_dir, num_classes=FASHION_MNIST_NUM_CLASSES,
           in_chans=FASHION_MNIST_INPUT_SIZE[0],
           data_config=dict(input_size=FASHION_MNIST_INPUT_SIZE, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
                            crop_pct=1.0), card_data=card_data, overwrite=True)


def thread_env(threads: int) -> Dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS='ignore')


def run_queue(
        study: Study,
        runs: Sequence[Run],
        train_py: Path,
        finish: Callable[[Run, List[str]], Dict[str, object]],
        threads: int = 1,
        retries: int = 2,
        retry_wait_s: float = 120.,
) -> None:
    """ Trains the runs not yet in runs.csv, one at a time, in order; `finish(run, command)` evaluates a trained run
    and returns its runs.csv row. A run whose train.py fails is retried (`retries` times, `retry_wait_s` apart:
    the working tree may be mid-edit when it starts) and then left for the next invocation. """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through `train`, which stops its process
    done = recorded_runs(study)
    todo = [r for r in runs if r.name not in done]
    _log(f'{len(done)} runs recorded, {len(todo)} to do: {" ".join(r.name for r in todo)}')
    for run in todo:
        if run.distill and not (study.teacher_dir / 'config.json').exists():
            _log(f'skip {run.name}: no exported teacher yet')
            continue
        for attempt in range(retries + 1):
            start = time.time()
            code, command = train(study, run, train_py, threads)
            if code == 0 and epochs_done(study, run) >= run.epochs:
                break
            _log(f'FAILED {run.name} (exit {code}, {time.time() - start:.0f} s), see {study.run_dir(run) / "log.txt"}')
            if attempt < retries:
                time.sleep(retry_wait_s)
        else:
            continue
        try:
            row = finish(run, command)
        except Exception as e:  # e.g. the test evaluation failed: keep going; the next invocation finishes it again
            _log(f'FAILED to finish {run.name}: {type(e).__name__}: {e}')
            continue
        append_row(study.runs_csv, study.fields, row)
        shutil.rmtree(study.carried / run.name, ignore_errors=True)
        _log(f'done {run.name}: ' + ', '.join(f'{k} {row[k]}' for k in ('top1_val', 'top1_test') if k in row))


# --- published weights -----------------------------------------------------------------------------------------------

def publish_weights(
        tag: str,
        source: Path,
        out: Path,
        card: Dict[str, object],
        test_root: Path,
        recorded_top1: float,
        tolerance: float,
        curves_png: Optional[Path] = None,
) -> Dict[str, float]:
    """ Writes the weight folder `out` of timm tag `tag` (e.g. timm_hybrid/weights/<arch>.fmnist) from `source`, a
    training checkpoint or a state-dict file (the folder's own model.safetensors for a re-render), with
    `timm_hybrid.hub.export`. The folder is then loaded as a user loads it (`local-dir:`, timm's data config, eval
    transforms and `ClassificationEvaluator`) and measured on the test set at `test_root`; it replaces `out` only if
    its top-1 is within `tolerance` points of `recorded_top1` (what the run's own evaluation measured). The card
    gets the measured top-1 / top-5 and, with `curves_png`, the run's curves as curves.png. Returns the measurement.
    """
    import tempfile
    import timm
    from timm_hybrid.data import evaluate_fashion_mnist
    from timm_hybrid.hub import export, render_model_card
    card = dict(card)
    with tempfile.TemporaryDirectory() as scratch:
        folder = export(tag, source, Path(scratch) / out.name, card_data=card)
        model = timm.create_model(f'local-dir:{folder}', pretrained=True)
        measured = evaluate_fashion_mnist(model, test_root)
        if abs(measured['top1'] - recorded_top1) > tolerance:
            raise RuntimeError(f'{out}: re-evaluated top-1 {measured["top1"]:.2f} is more than {tolerance} pt from '
                               f'the recorded {recorded_top1}; {out} left as it was')
        card['accuracy'] = {k: round(measured[k], 2) for k in ('top1', 'top5')}
        if curves_png is not None:
            shutil.copyfile(curves_png, folder / 'curves.png')
            card['curves'] = 'curves.png'
        render_model_card(model.eval(), card).save(folder / 'README.md')
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(folder, out)
    return measured
