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
runs.csv is skipped, so the study can span sessions (benchmarks/study_lib.py). Each finished run appends its row and
re-renders the report; the script does not commit. (The recorded runs ran two at a time; the queue now runs one.)
The micro study (benchmarks/fmnist_micro_study.py) supersedes this one; its results stay as recorded.

    python benchmarks/fmnist_study.py run --timm-scripts PATH/TO/pytorch-image-models
    python benchmarks/fmnist_study.py report
    python benchmarks/fmnist_study.py list
    python benchmarks/fmnist_study.py publish   # best run per model -> timm_hybrid/weights/<arch>.fmnist, verified
"""
import argparse
import csv
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_lib import (  # noqa: E402
    REPO, Run, Study, epochs_done, export_teacher, publish_weights, read_summary, recorded_runs, run_queue, save_curve,
    shown_command, train_images_per_second,
)
from timm_hybrid.data import FASHION_MNIST_INPUT_SIZE, FASHION_MNIST_MEAN, FASHION_MNIST_STD  # noqa: E402
from timm_hybrid.models.baselines import PACKAGED_WEIGHTS_DIR  # noqa: E402

RESULTS = REPO / 'benchmarks' / 'results' / 'fmnist'
# checkpoints and logs of unfinished runs: outside the work tree, so a later session on this machine can resume them
WORK = Path(os.environ.get('TIMM_HYBRID_STUDY_DIR', Path.home() / '.cache' / 'timm-hybrid' / 'fmnist-study'))
CURVES = RESULTS / 'curves'  # per-run copies of train.py's summary.csv

EPOCHS = {'full': 15, '10pct': 50}
VAL_INTERVAL = 5
TRAIN_FRACTION = {'full': None, '10pct': 0.1}
# One recipe for every model: AdamW + cosine, mild crop / flip augmentation (28 px leaves little room for
# RandomResizedCrop's default 8% scale), label smoothing 0.1 (train.py default).
RECIPE = (
    '--device cpu --device-modules timm_hybrid --dataset torch/fashion_mnist --train-split train --val-split test '
    f'--num-classes 10 --input-size 1 28 28 --mean {FASHION_MNIST_MEAN[0]:.4f} --std {FASHION_MNIST_STD[0]:.4f} '
    '--crop-pct 1.0 '
    '--batch-size 128 --opt adamw --lr 1e-3 --weight-decay 0.05 --sched cosine --warmup-epochs 2 --min-lr 1e-5 '
    '--scale 0.6 1.0 --hflip 0.5 --color-jitter 0 --smoothing 0.1 --workers 1 --log-interval 100 '
    '--checkpoint-hist 1'
)
FAMILIES = ('cnt', 'tnt', 'deit')
DISPLAY_NAMES = {'cnt': 'CNT', 'tnt': 'TNT', 'deit': 'DeiT'}
TEACHER_MODEL = 'resnet18'
TEACHER_RUN = 'teacher-resnet18-10pct-s0'
# timm_hybrid/weights/<arch>.fmnist folders: the three families and the distilled variants (their .fmnist tags
# load them)
PUBLISHED_MODELS = tuple(f'{f}_nano_patch7_28' for f in FAMILIES) + (
    'cnt_nano_distilled_patch7_28', 'deit_nano_distilled_patch7_28')

FIELDS = ('run', 'group', 'model', 'model_kwargs', 'distill', 'data', 'train_images', 'seed', 'epochs', 'top1_last',
          'top1_best', 'gmacs', 'params_m', 'sec_per_epoch', 'train_img_per_s', 'threads', 'finished', 'command')


def _run(name: str, group: str, model: str, data: str, seed: int = 0, model_kwargs=(), distill: str = '') -> Run:
    # the main runs report the test accuracy of every epoch; the others evaluate (and checkpoint) every 5th and
    # the last epoch, which saves about a third of a 10%-subset epoch (10k test images vs 6k training images)
    # and leaves the recipe unchanged (the random stream differs: each evaluation's loader draws a seed)
    return Run(name, group, model, data, seed, EPOCHS[data], 1 if group == 'main' else VAL_INTERVAL,
               tuple(model_kwargs), distill)


def planned_runs() -> List[Run]:
    """ All runs, in the order they are worth having: the main comparison (10% subset, then both full-set seeds: the
    long runs early keep two parallel slots evenly busy towards the end), the teacher (so distillation can start as
    soon as it is exported), ablations, distillation. """
    runs = [_run(f'{f}-10pct-s{s}', 'main', f'{f}_nano_patch7_28', '10pct', s) for s in (0, 1) for f in FAMILIES]
    runs += [_run(f'{f}-full-s{s}', 'main', f'{f}_nano_patch7_28', 'full', s) for s in (0, 1) for f in FAMILIES]
    runs.append(_run(TEACHER_RUN, 'teacher', TEACHER_MODEL, '10pct', 0))
    for kwargs in ('inner_block=bottleneck', 'inner_block=attn', 'patch_pos_embed=none', 'patch_pos_embed=sincos',
                   'pixel_pos_embed=none', 'pixel_pos_embed=sincos'):
        runs.append(_run(f'cnt-10pct-s0-{kwargs.replace("=", "-")}', 'ablation', 'cnt_nano_patch7_28', '10pct', 0,
                        (kwargs,)))
    for distill in ('', 'hard', 'soft'):
        runs.append(_run(f'cnt_distilled-10pct-s0-{distill or "nodistill"}', 'distill',
                        'cnt_nano_distilled_patch7_28', '10pct', 0, distill=distill))
    # DeiT's own recipe (hard token distillation) on the DeiT baseline, with its no-teacher control
    for distill in ('', 'hard'):
        runs.append(_run(f'deit_distilled-10pct-s0-{distill or "nodistill"}', 'distill',
                        'deit_nano_distilled_patch7_28', '10pct', 0, distill=distill))
    return runs


def data_root(data: str, eval_split: str = 'test') -> Path:
    """ The nano study evaluated on the test set every epoch (it predates the validation split). """
    from timm_hybrid.data import prepare_fashion_mnist
    root = WORK / 'data' / data
    if not (root / 'FashionMNIST' / 'raw' / 't10k-labels-idx1-ubyte').exists():
        prepare_fashion_mnist(root, train_fraction=TRAIN_FRACTION[data], seed=0)
    return root


STUDY = Study(results=RESULTS, work=WORK, recipe=RECIPE, fields=FIELDS, data_root=data_root,
              teacher_dir=WORK / 'teacher_export')


def record(run: Run, command: Sequence[str], threads: int) -> Dict[str, object]:
    """ The runs.csv row of a finished run (the recorded rows also hold the wall-clock seconds per epoch of the two
    parallel slots they ran in; the sequential queue leaves that column empty). """
    from timm_hybrid import count_flops
    summary = read_summary(STUDY.run_dir(run) / 'summary.csv')
    kwargs = dict(kv.split('=', 1) for kv in run.model_kwargs)
    flops = count_flops(run.model, input_size=FASHION_MNIST_INPUT_SIZE, num_classes=10, in_chans=1, **kwargs)
    save_curve(STUDY, run)
    if run.group == 'teacher':
        export_teacher(STUDY, TEACHER_MODEL, WORK / TEACHER_RUN / 'model_best.pth.tar')
    return dict(
        run=run.name, group=run.group, model=run.model, model_kwargs=' '.join(run.model_kwargs),
        distill=run.distill, data=run.data, train_images=60000 if run.data == 'full' else 6000, seed=run.seed,
        epochs=epochs_done(STUDY, run), top1_last=float(summary[-1]['eval_top1']),
        top1_best=max(float(r['eval_top1']) for r in summary), gmacs=round(flops.gmacs, 5),
        params_m=round(flops.mparams, 4), sec_per_epoch='',
        train_img_per_s=train_images_per_second(STUDY.run_dir(run) / 'log.txt') or '', threads=threads,
        finished=time.strftime('%Y-%m-%d %H:%M'), command=shown_command(command).replace(
            f'python {command[1]}', 'python train.py'))


def run_study(args: argparse.Namespace) -> None:
    train_py = Path(args.timm_scripts) / 'train.py'
    if not train_py.exists():
        sys.exit(f'{train_py} not found: pass --timm-scripts, a checkout of huggingface/pytorch-image-models '
                 f'(train.py is not in the timm wheel).')
    runs = [r for r in planned_runs() if not args.only or r.group in args.only or r.name in args.only]
    WORK.mkdir(parents=True, exist_ok=True)

    def finish(run: Run, command: List[str]) -> Dict[str, object]:
        row = record(run, command, args.threads)
        write_report()
        return row

    run_queue(STUDY, runs, train_py, finish, threads=args.threads)
    write_report()


# --- weights ---------------------------------------------------------------------------------------------------------

def publish() -> None:
    """ Exports the best run of each published model (by final-epoch test top-1; the three families from the main
    runs, the distilled variants from the distillation runs) as timm_hybrid/weights/<arch>.fmnist with
    `timm_hybrid.hub.export`, re-loads the folder as a user would (`local-dir:`, timm's data config, eval transforms
    and `ClassificationEvaluator`), checks that it reproduces the top-1 train.py recorded, and writes the measured
    top-1 / top-5 into the card's model-index. The source is the run's last checkpoint, or, once the run's work
    folder is gone, the weights already in the package (the card is re-rendered from the same tensors). """
    rows = recorded_runs(STUDY)
    best = {}
    for model_name in PUBLISHED_MODELS:
        mine = [r for r in rows.values() if r['model'] == model_name and r['group'] in ('main', 'distill')]
        if mine:
            best[model_name] = max(mine, key=lambda r: float(r['top1_last']))
    test_root = data_root('full')  # the test split is the same in every layout
    for model_name, row in best.items():
        out = PACKAGED_WEIGHTS_DIR / f'{model_name}.fmnist'
        checkpoint = WORK / row['run'] / 'last.pth.tar'
        if not checkpoint.is_file():
            checkpoint = out / 'model.safetensors'
        compare = [dict(model=f'{other} (best run)', top1=float(b['top1_last']), params=float(b['params_m']),
                        gmacs=float(b['gmacs']), input_size=(1, 28, 28)) for other, b in best.items()
                   if other != model_name]
        data_text = '60k-image training set' if row['data'] == 'full' else 'fixed class-balanced 10% (6k images)'
        if row['distill']:
            teacher = rows[TEACHER_RUN]
            data_text += (f', {row["distill"]} token distillation from the {TEACHER_MODEL} teacher trained in '
                          f'run `{TEACHER_RUN}` (top-1 {teacher["top1_last"]})')
        card = dict(
            train_command=f'timm-hybrid data fashion-mnist --root data/fm  # {data_text}\n{row["command"]}',
            compare=compare,
            description=f'{model_name} trained from scratch on Fashion-MNIST ({data_text}, {row["epochs"]} epochs, '
                        f'seed {row["seed"]}) with timm\'s train.py, run `{row["run"]}` of the study in '
                        f'benchmarks/fmnist_study.py. Accuracy: test split, final epoch (no checkpoint selection), '
                        f'measured on this folder with timm\'s data config and ClassificationEvaluator '
                        f'(`timm_hybrid.data.evaluate_fashion_mnist`).')
        measured = publish_weights(f'{model_name}.fmnist', checkpoint, out, card, test_root,
                                   float(row['top1_last']), tolerance=0.02)
        print(f'{out.relative_to(REPO)}: run {row["run"]}, top-1 {measured["top1"]:.2f} (recorded '
              f'{row["top1_last"]}), top-5 {measured["top5"]:.2f}, from {checkpoint}')


# --- report ----------------------------------------------------------------------------------------------------------

def _mean_spread(values: Sequence[float]) -> str:
    if not values:
        return '-'
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f'{mean:.2f} (n=1)'
    return f'{mean:.2f} ± {(max(values) - min(values)) / 2:.2f} (n={len(values)})'


def write_report() -> None:
    rows = list(recorded_runs(STUDY).values())
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
    p.add_argument('--threads', type=int, default=1, help='torch threads per run')
    p.add_argument('--only', nargs='+', default=None, help='groups (main, ablation, teacher, distill) or run names')
    sub.add_parser('report', help='re-render README.md and the plot from runs.csv')
    sub.add_parser('list', help='planned runs and whether they are recorded')
    sub.add_parser('publish', help='export and verify the best run of each model as timm_hybrid/weights/<arch>.fmnist')
    args = parser.parse_args()
    if args.command == 'run':
        run_study(args)
    elif args.command == 'report':
        write_report()
    elif args.command == 'publish':
        publish()
    else:
        done = recorded_runs(STUDY)
        for r in planned_runs():
            print(f'{"done" if r.name in done else "todo"}  {r.group:8s} {r.name}')


if __name__ == '__main__':
    main()
