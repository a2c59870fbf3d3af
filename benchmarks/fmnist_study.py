""" Fashion-MNIST study: CNT vs TNT vs DeiT at matched compute, trained from scratch with timm's own train.py.

The three `*_nano_patch7_28` models (28x28 grayscale, 16 patch tokens, depth 6) are matched in fvcore GMACs. Every
run uses the same timm recipe (RECIPE below); the study has four groups:

* main:     3 families x 2 seeds x {full training set (15 epochs), fixed class-balanced 10% subset (50 epochs)}
* ablation: CNT on the 10% subset, one seed: inner block (bottleneck / attn) and position encodings
            (patch / pixel: none / sincos; the learned default is the main run)
* teacher:  a ResNet-18 CNN teacher on the 10% subset, exported with `timm_hybrid.hub.export`
* distill:  cnt_nano_distilled on the 10% subset with timm's TokenDistillationTask (hard, soft) and without;
            deit_nano_distilled (hard) and without, DeiT's own recipe on the baseline

Runs are resumable (train.py's --resume from the run's last checkpoint) and recorded once finished: a run already in
runs.csv is skipped, so the study can span sessions. Each finished run appends its row, re-renders the report and
(with --commit) commits the results folder.

    python benchmarks/fmnist_study.py run --timm-scripts PATH/TO/pytorch-image-models [--parallel 2] [--commit]
    python benchmarks/fmnist_study.py report
    python benchmarks/fmnist_study.py list
    python benchmarks/fmnist_study.py publish   # best main run per family -> weights/<arch>.fmnist, verified
"""
import argparse
import csv
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'benchmarks' / 'results' / 'fmnist'
# checkpoints and logs of unfinished runs: outside the work tree, so a later session on this machine can resume them
WORK = Path(os.environ.get('TIMM_HYBRID_STUDY_DIR', Path.home() / '.cache' / 'timm-hybrid' / 'fmnist-study'))
RUNS_CSV = RESULTS / 'runs.csv'
CURVES = RESULTS / 'curves'  # per-run copies of train.py's summary.csv

EPOCHS = {'full': 15, '10pct': 50}
VAL_INTERVAL = 5
TRAIN_FRACTION = {'full': None, '10pct': 0.1}
# One recipe for every model: AdamW + cosine, mild crop / flip augmentation (28 px leaves little room for
# RandomResizedCrop's default 8% scale), label smoothing 0.1 (train.py default).
RECIPE = (
    '--device cpu --device-modules timm_hybrid --dataset torch/fashion_mnist --train-split train --val-split test '
    '--num-classes 10 --input-size 1 28 28 --mean 0.2860 --std 0.3530 --crop-pct 1.0 '
    '--batch-size 128 --opt adamw --lr 1e-3 --weight-decay 0.05 --sched cosine --warmup-epochs 2 --min-lr 1e-5 '
    '--scale 0.6 1.0 --hflip 0.5 --color-jitter 0 --smoothing 0.1 --workers 1 --log-interval 100 '
    '--checkpoint-hist 1'
)
FAMILIES = ('cnt', 'tnt', 'deit')
DISPLAY_NAMES = {'cnt': 'CNT', 'tnt': 'TNT', 'deit': 'DeiT'}
TEACHER_MODEL = 'resnet18'
TEACHER_RUN = 'teacher-resnet18-10pct-s0'
# weights/<arch>.fmnist folders: the three families and the distilled variants (their .fmnist tags point at them)
PUBLISHED_MODELS = tuple(f'{f}_nano_patch7_28' for f in FAMILIES) + (
    'cnt_nano_distilled_patch7_28', 'deit_nano_distilled_patch7_28')

FIELDS = ('run', 'group', 'model', 'model_kwargs', 'distill', 'data', 'train_images', 'seed', 'epochs', 'top1_last',
          'top1_best', 'gmacs', 'params_m', 'sec_per_epoch', 'train_img_per_s', 'threads', 'finished', 'command')
# train.py's progress line; the parenthesised figures are the running averages over the epoch so far
TRAIN_LOG_LINE = re.compile(r'^Train: (\d+) \[\s*(\d+)/(\d+) .*\(\s*[\d.]+s,\s*([\d.]+)/s\)')


@dataclass(frozen=True)
class Run:
    name: str
    group: str
    model: str
    data: str
    seed: int = 0
    model_kwargs: Tuple[str, ...] = ()
    distill: str = ''  # '', 'hard' or 'soft'

    @property
    def epochs(self) -> int:
        return EPOCHS[self.data]

    @property
    def val_interval(self) -> int:
        # the main runs report the test accuracy of every epoch; the others evaluate (and checkpoint) every 5th and
        # the last epoch, which saves about a third of a 10%-subset epoch (10k test images vs 6k training images)
        # and leaves the recipe unchanged (the random stream differs: each evaluation's loader draws a seed)
        return 1 if self.group == 'main' else VAL_INTERVAL


def planned_runs() -> List[Run]:
    """ All runs, in the order they are worth having: the main comparison (10% subset, then both full-set seeds: the
    long runs early keep two parallel slots evenly busy towards the end), the teacher (so distillation can start as
    soon as it is exported), ablations, distillation. """
    runs = [Run(f'{f}-10pct-s{s}', 'main', f'{f}_nano_patch7_28', '10pct', s) for s in (0, 1) for f in FAMILIES]
    runs += [Run(f'{f}-full-s{s}', 'main', f'{f}_nano_patch7_28', 'full', s) for s in (0, 1) for f in FAMILIES]
    runs.append(Run(TEACHER_RUN, 'teacher', TEACHER_MODEL, '10pct', 0))
    for kwargs in ('inner_block=bottleneck', 'inner_block=attn', 'patch_pos_embed=none', 'patch_pos_embed=sincos',
                   'pixel_pos_embed=none', 'pixel_pos_embed=sincos'):
        runs.append(Run(f'cnt-10pct-s0-{kwargs.replace("=", "-")}', 'ablation', 'cnt_nano_patch7_28', '10pct', 0,
                        (kwargs,)))
    for distill in ('', 'hard', 'soft'):
        runs.append(Run(f'cnt_distilled-10pct-s0-{distill or "nodistill"}', 'distill',
                        'cnt_nano_distilled_patch7_28', '10pct', 0, distill=distill))
    # DeiT's own recipe (hard token distillation) on the DeiT baseline, with its no-teacher control
    for distill in ('', 'hard'):
        runs.append(Run(f'deit_distilled-10pct-s0-{distill or "nodistill"}', 'distill',
                        'deit_nano_distilled_patch7_28', '10pct', 0, distill=distill))
    return runs


def data_root(data: str) -> Path:
    from timm_hybrid.data import prepare_fashion_mnist
    root = WORK / 'data' / data
    if not (root / 'FashionMNIST' / 'raw' / 't10k-labels-idx1-ubyte').exists():
        prepare_fashion_mnist(root, train_fraction=TRAIN_FRACTION[data], seed=0)
    return root


def teacher_dir() -> Path:
    return WORK / 'teacher_export'


def train_command(run: Run, train_py: Path) -> List[str]:
    cmd = [sys.executable, str(train_py), *shlex.split(RECIPE), '--data-dir', str(data_root(run.data)),
           '--model', run.model, '--epochs', str(run.epochs), '--seed', str(run.seed),
           '--output', str(WORK), '--experiment', run.name]
    if run.val_interval != 1:
        cmd += ['--val-interval', str(run.val_interval)]
    if run.model_kwargs:
        cmd += ['--model-kwargs', *run.model_kwargs]
    if run.distill:
        cmd += ['--kd-model-name', f'local-dir:{teacher_dir()}', '--kd-distill-type', 'token',
                '--kd-token-distill-type', run.distill]
    return cmd


def read_summary(run: Run) -> List[Dict[str, str]]:
    """ train.py's per-epoch summary.csv (a resumed run may repeat the header or an epoch: last one wins). """
    path = WORK / run.name / 'summary.csv'
    if not path.exists():
        return []
    by_epoch = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get('epoch', 'epoch') != 'epoch':
                by_epoch[int(row['epoch'])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def train_images_per_second(run: Run) -> Optional[float]:
    """ Training throughput without the per-epoch evaluation and checkpointing: the median over epochs of train.py's
    epoch-average images/s (its last progress line of each epoch; a resumed epoch's later line wins). """
    path = WORK / run.name / 'log.txt'
    if not path.exists():
        return None
    per_epoch = {}
    for line in path.read_text(errors='replace').splitlines():
        match = TRAIN_LOG_LINE.match(line)
        if match and int(match.group(2)) + 1 == int(match.group(3)):
            per_epoch[int(match.group(1))] = float(match.group(4))
    return round(statistics.median(per_epoch.values()), 1) if per_epoch else None


def epochs_done(run: Run) -> int:
    """ Epochs finished and checkpointed (train.py writes summary.csv and checkpoints only on evaluated epochs). """
    summary = read_summary(run)
    return int(summary[-1]['epoch']) + 1 if summary else 0


def recorded_runs() -> Dict[str, Dict[str, str]]:
    if not RUNS_CSV.exists():
        return {}
    with open(RUNS_CSV) as f:
        return {row['run']: row for row in csv.DictReader(f)}


def save_curve(run: Run) -> None:
    """ Keeps the run's per-epoch test accuracy with the results (train.py's summary.csv lives in the work dir). """
    CURVES.mkdir(parents=True, exist_ok=True)
    rows = read_summary(run)
    with open(CURVES / f'{run.name}.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _without_resume(args: Sequence[str]) -> List[str]:
    """ The run's command as it would be typed for a fresh start (a session that resumed it added --resume). """
    args = list(args)
    if '--resume' in args:
        i = args.index('--resume')
        del args[i:i + 2]
    return args


def record(run: Run, command: Sequence[str], sec_per_epoch: float, threads: int) -> Dict[str, str]:
    from timm_hybrid import count_flops
    summary = read_summary(run)
    kwargs = dict(kv.split('=', 1) for kv in run.model_kwargs)
    flops = count_flops(run.model, input_size=(1, 28, 28), num_classes=10, in_chans=1, **kwargs)
    train_images = 60000 if run.data == 'full' else 6000
    row = dict(
        run=run.name, group=run.group, model=run.model, model_kwargs=' '.join(run.model_kwargs),
        distill=run.distill, data=run.data, train_images=train_images, seed=run.seed, epochs=epochs_done(run),
        top1_last=float(summary[-1]['eval_top1']), top1_best=max(float(r['eval_top1']) for r in summary),
        gmacs=round(flops.gmacs, 5), params_m=round(flops.mparams, 4), sec_per_epoch=round(sec_per_epoch, 1),
        train_img_per_s=train_images_per_second(run) or '', threads=threads, finished=time.strftime('%Y-%m-%d %H:%M'),
        command=shlex.join(['python', 'train.py', *_without_resume(command[2:])]).replace(str(REPO) + '/', ''),
    )
    save_curve(run)
    new_file = not RUNS_CSV.exists()
    with open(RUNS_CSV, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerow(row)
    return row


def export_teacher() -> None:
    from timm_hybrid.hub import export
    # the recipe's data settings go into its config.json: train.py's distillation re-normalises the student's input
    # with the teacher's mean / std
    export(TEACHER_MODEL, WORK / TEACHER_RUN / 'model_best.pth.tar', teacher_dir(), num_classes=10, in_chans=1,
           data_config=dict(input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,), crop_pct=1.0))


def git_commit(message: str) -> None:
    for _ in range(5):  # other writers may hold the index lock for a moment
        subprocess.run(['git', 'add', str(RESULTS)], cwd=REPO, capture_output=True)
        done = subprocess.run(['git', 'commit', '-q', '-m', message, '--', str(RESULTS)], cwd=REPO,
                              capture_output=True, text=True)
        if done.returncode == 0 or 'nothing' in done.stdout + done.stderr:
            return
        time.sleep(3)
    print(f'warning: could not commit: {done.stderr.strip()}', file=sys.stderr)


@dataclass
class Active:
    run: Run
    proc: subprocess.Popen
    command: List[str]
    start: float
    epochs_before: int


def run_study(args: argparse.Namespace) -> None:
    train_py = Path(args.timm_scripts) / 'train.py'
    if not train_py.exists():
        sys.exit(f'{train_py} not found: pass --timm-scripts, a checkout of huggingface/pytorch-image-models '
                 f'(train.py is not in the timm wheel).')
    done = recorded_runs()
    todo = [r for r in planned_runs() if r.name not in done and (not args.only or r.group in args.only
                                                                  or r.name in args.only)]
    print(f'{len(done)} runs recorded, {len(todo)} to do: {[r.name for r in todo]}', flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONWARNINGS='ignore')
    active: List[Active] = []
    while todo or active:
        while todo and len(active) < args.parallel:
            # a distilled run needs the exported teacher: wait for it while the teacher is still training
            ready = [r for r in todo if not r.distill or (teacher_dir() / 'config.json').exists()]
            if not ready:
                if not active:
                    sys.exit('distillation runs need the teacher run: run it first (--only teacher)')
                break
            run = ready[0]
            todo.remove(run)
            command = train_command(run, train_py)
            last = WORK / run.name / 'last.pth.tar'
            if last.exists():
                command += ['--resume', str(last)]
            (WORK / run.name).mkdir(parents=True, exist_ok=True)
            log = open(WORK / run.name / 'log.txt', 'a')
            print(f'[{time.strftime("%H:%M")}] start {run.name}' + (' (resumed)' if last.exists() else ''),
                  flush=True)
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=WORK)
            active.append(Active(run, proc, command, time.time(), epochs_done(run)))
        time.sleep(10)
        for a in list(active):
            if a.proc.poll() is None:
                if args.progress:
                    n = epochs_done(a.run)
                    print(f'  {a.run.name}: epoch {n}/{a.run.epochs}', flush=True)
                continue
            active.remove(a)
            epochs_run = epochs_done(a.run) - a.epochs_before
            if a.proc.returncode != 0 or epochs_done(a.run) < a.run.epochs:
                print(f'[{time.strftime("%H:%M")}] FAILED {a.run.name} (exit {a.proc.returncode}), see '
                      f'{WORK / a.run.name / "log.txt"}', flush=True)
                continue
            row = record(a.run, a.command, (time.time() - a.start) / max(epochs_run, 1), args.threads)
            print(f'[{time.strftime("%H:%M")}] done {a.run.name}: top1 {row["top1_last"]} '
                  f'({row["sec_per_epoch"]} s/epoch)', flush=True)
            if a.run.group == 'teacher':
                export_teacher()
            write_report()
            if args.commit:
                git_commit(f'fmnist study: {a.run.name} top1 {row["top1_last"]}')


# --- weights ---------------------------------------------------------------------------------------------------------

def publish() -> None:
    """ Exports the best run of each published model (by final-epoch test top-1; the three families from the main
    runs, the distilled variants from the distillation runs) as weights/<arch>.fmnist with `timm_hybrid.hub.export`,
    then re-loads the folder as a user would (`local-dir:`, timm's data config and eval transforms) and checks it
    reproduces the accuracy train.py recorded. """
    import json
    import timm
    from timm_hybrid.data import evaluate_fashion_mnist
    from timm_hybrid.hub import export
    rows = recorded_runs()
    best = {}
    for model_name in PUBLISHED_MODELS:
        mine = [r for r in rows.values() if r['model'] == model_name and r['group'] in ('main', 'distill')]
        if mine:
            best[model_name] = max(mine, key=lambda r: float(r['top1_last']))
    test_root = data_root('full')  # the test split is the same in every layout
    for model_name, row in best.items():
        out = REPO / 'weights' / f'{model_name}.fmnist'
        compare = [dict(model=f'{other} (best run)', top1=float(b['top1_last']), params=float(b['params_m']),
                        gmacs=float(b['gmacs']), input_size=(1, 28, 28)) for other, b in best.items()
                   if other != model_name]
        data_text = '60k-image training set' if row['data'] == 'full' else 'fixed class-balanced 10% (6k images)'
        if row['distill']:
            teacher = rows[TEACHER_RUN]
            data_text += (f', {row["distill"]} token distillation from the {TEACHER_MODEL} teacher trained in '
                          f'run `{TEACHER_RUN}` (top-1 {teacher["top1_last"]})')
        card = dict(
            accuracy={'top1': float(row['top1_last'])},
            train_command=f'timm-hybrid data fashion-mnist --root data/fm  # {data_text}\n{row["command"]}',
            compare=compare,
            description=f'{model_name} trained from scratch on Fashion-MNIST ({data_text}, {row["epochs"]} epochs, '
                        f'seed {row["seed"]}) with timm\'s train.py, run `{row["run"]}` of the study in '
                        f'benchmarks/fmnist_study.py. Accuracy: test split, final epoch (no checkpoint selection).')
        export(f'{model_name}.fmnist', WORK / row['run'] / 'last.pth.tar', out, card_data=card)
        model = timm.create_model(f'local-dir:{out}', pretrained=True)
        measured = evaluate_fashion_mnist(model, test_root)
        if abs(measured['top1'] - float(row['top1_last'])) > 0.02:
            raise RuntimeError(f'{out}: re-evaluated top-1 {measured["top1"]:.2f} != recorded {row["top1_last"]}')
        (out / 'eval_results.json').write_text(json.dumps(dict(
            dataset='fashion_mnist', split='test', run=row['run'], **{k: round(v, 2) for k, v in measured.items()},
            command=f'python -c "import timm, timm_hybrid; from timm_hybrid.data import evaluate_fashion_mnist; '
                    f'print(evaluate_fashion_mnist(timm.create_model(\'local-dir:weights/{out.name}\', '
                    f'pretrained=True), \'data/fm\'))"'), indent=1) + '\n')
        print(f'{out.relative_to(REPO)}: run {row["run"]}, top-1 {measured["top1"]:.2f} (recorded '
              f'{row["top1_last"]}), top-5 {measured["top5"]:.2f}')


# --- report ----------------------------------------------------------------------------------------------------------

def _mean_spread(values: Sequence[float]) -> str:
    if not values:
        return '-'
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f'{mean:.2f} (n=1)'
    return f'{mean:.2f} ± {(max(values) - min(values)) / 2:.2f} (n={len(values)})'


def write_report() -> None:
    rows = list(recorded_runs().values())
    if not rows:
        return
    lines = ['# Fashion-MNIST study: CNT vs TNT vs DeiT at matched GMACs', '',
             'Produced by `python benchmarks/fmnist_study.py run` (timm train.py, recipe below; every row of '
             '[runs.csv](runs.csv) holds its exact command). Accuracy: test-set top-1 after the last epoch '
             '(no early stopping on the test set); ± is half the range over seeds. Time: wall-clock seconds per '
             'epoch on this 2-core machine, one thread per run, two runs side by side, including evaluation of the 10k '
             'test images and checkpointing; train img/s is the training loop alone (median over epochs of train.py\'s '
             'epoch average). Other work shared the machine during some runs, so compare families rather than read '
             'the absolute figures; `timm-hybrid compare` gives interleaved speed ratios. Ablation, teacher and '
             'distillation runs evaluate every 5th and the last epoch (`--val-interval 5`): their s/epoch is not '
             'comparable with the main runs\' and their best top-1 is over those epochs only.', '',
             f'Recipe: `{RECIPE}`', '', '## Main comparison', '',
             '| model | GMACs | params (M) | top-1, 10% subset (50 ep) | top-1, full (15 ep) | s/epoch (10%) | '
             's/epoch (full) | train img/s (10%) | train img/s (full) |',
             '|---|---|---|---|---|---|---|---|---|']
    main = [r for r in rows if r['group'] == 'main']
    for family in FAMILIES:
        model = f'{family}_nano_patch7_28'
        mine = [r for r in main if r['model'] == model]
        if not mine:
            continue
        acc = {d: [float(r['top1_last']) for r in mine if r['data'] == d] for d in ('10pct', 'full')}
        sec = {d: [float(r['sec_per_epoch']) for r in mine if r['data'] == d] for d in ('10pct', 'full')}
        speed = {d: [float(r['train_img_per_s']) for r in mine if r['data'] == d and r.get('train_img_per_s')]
                 for d in ('10pct', 'full')}
        lines.append(f'| {model} | {float(mine[0]["gmacs"]):.5f} | {float(mine[0]["params_m"]):.3f} | '
                     f'{_mean_spread(acc["10pct"])} | {_mean_spread(acc["full"])} | '
                     + ' | '.join(_mean_spread(v[d]).split(' (')[0] for v in (sec, speed) for d in ('10pct', 'full'))
                     + ' |')
    for group, title in (('ablation', 'CNT ablations (10% subset, seed 0)'),
                         ('teacher', 'Distillation teacher'), ('distill', 'Token distillation (10% subset, seed 0)')):
        mine = [r for r in rows if r['group'] == group]
        if group == 'ablation':
            mine = [r for r in main if r['run'] == 'cnt-10pct-s0'] + mine
        if not mine:
            continue
        lines += ['', f'## {title}', '', '| run | model kwargs | distill | GMACs | params (M) | top-1 | best top-1 | '
                  's/epoch | train img/s |', '|---|---|---|---|---|---|---|---|---|']
        for r in mine:
            lines.append(f'| {r["run"]} | {r["model_kwargs"] or "(default)"} | {r["distill"] or "-"} | '
                         f'{float(r["gmacs"]):.5f} | {float(r["params_m"]):.3f} | {r["top1_last"]} | '
                         f'{r["top1_best"]} | {r["sec_per_epoch"]} | {r.get("train_img_per_s") or "-"} |')
    lines += ['', '![accuracy vs GMACs](accuracy_vs_gmacs.png)', '',
              'Test top-1 after every epoch of the main runs (per-run curves in [curves/](curves)):', '',
              '![test top-1 per epoch](top1_per_epoch.png)', '']
    (RESULTS / 'README.md').write_text('\n'.join(lines))
    _plot(main)
    _plot_curves(main)


def _plot(main: List[Dict[str, str]]) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, data, title in zip(axes, ('10pct', 'full'), ('10% subset (6k images, 50 epochs)',
                                                         'full training set (60k images, 15 epochs)')):
        for family, marker in zip(FAMILIES, 'osD'):
            pts = [(float(r['gmacs']) * 1000, float(r['top1_last'])) for r in main
                   if r['model'] == f'{family}_nano_patch7_28' and r['data'] == data]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, s=50, label=DISPLAY_NAMES[family])
        ax.set_title(title)
        ax.set_xlabel('fvcore MMACs per image')
        ax.set_ylabel('test top-1 (%)')
        ax.grid(alpha=.3)
        ax.legend()
    fig.suptitle('Fashion-MNIST, nano models at matched compute (each point one seed)')
    fig.tight_layout()
    fig.savefig(RESULTS / 'accuracy_vs_gmacs.png', dpi=120)
    plt.close(fig)


def _plot_curves(main: List[Dict[str, str]]) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, data in zip(axes, ('10pct', 'full')):
        for family, color in zip(FAMILIES, ('tab:blue', 'tab:orange', 'tab:green')):
            for r in main:
                path = CURVES / f'{r["run"]}.csv'
                if r['model'] != f'{family}_nano_patch7_28' or r['data'] != data or not path.exists():
                    continue
                with open(path) as f:
                    curve = [(int(row['epoch']) + 1, float(row['eval_top1'])) for row in csv.DictReader(f)]
                ax.plot(*zip(*curve), color=color, ls='-' if r['seed'] == '0' else '--', lw=1.2,
                        label=f'{DISPLAY_NAMES[family]} seed {r["seed"]}')
        ax.set_title(f'{"10% subset" if data == "10pct" else "full training set"}')
        ax.set_xlabel('epoch')
        ax.set_ylabel('test top-1 (%)')
        ax.set_ylim(bottom=60)
        ax.grid(alpha=.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / 'top1_per_epoch.png', dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('run', help='train the runs not yet recorded')
    p.add_argument('--timm-scripts', default=os.environ.get('TIMM_SCRIPTS', '/tmp/timm_scripts'),
                   help='folder holding timm\'s train.py (a pytorch-image-models checkout)')
    p.add_argument('--parallel', type=int, default=2, help='runs side by side')
    p.add_argument('--threads', type=int, default=1, help='torch threads per run')
    p.add_argument('--only', nargs='+', default=None, help='groups (main, ablation, teacher, distill) or run names')
    p.add_argument('--commit', action='store_true', help='git-commit the results folder after each finished run')
    p.add_argument('--progress', action='store_true', help='print each active run\'s epoch every 10 s')
    sub.add_parser('report', help='re-render README.md and the plot from runs.csv')
    sub.add_parser('list', help='planned runs and whether they are recorded')
    sub.add_parser('publish', help='export and verify the best run of each family as weights/<arch>.fmnist')
    args = parser.parse_args()
    if args.command == 'run':
        run_study(args)
    elif args.command == 'report':
        write_report()
    elif args.command == 'publish':
        publish()
    else:
        done = recorded_runs()
        for r in planned_runs():
            print(f'{"done" if r.name in done else "todo"}  {r.group:8s} {r.name}')


if __name__ == '__main__':
    main()
