""" Fashion-MNIST: does a seed's layer, inserted into a trained timm host, help fine-tuning it for the same time?

The host is `deit_nano_patch7_28` (28 px, 16 patch tokens, depth 6), trained here from scratch with timm's train.py
on a fixed class-balanced 10% draw of the training set (the 'pretrain' group). It is then fine-tuned on another 10% draw
(seed 1 of the same 55000 images, about a tenth of them shared with the host's), 3 seeds per arm:

* host alone ('host'): `deit_nano_patch7_28` from the host's weights;
* host + layer ('refined'): `deit_nano_refined_patch7_28` (every block's attention maps refined, handed on from
  block to block, `timm_hybrid.layers.refine_attention`) from the same weights, the new layers at their identity
  start, for the same training time as the host alone;
* host + layer, same epochs ('refined_epochs'): as 'refined' for the host alone's epochs (more time), which separates
  what the layer does per step from what its cost takes away.

Same time: the two models' training img/s are measured side by side first (`timm-hybrid compare`, 1 thread, batch
128, in compare/), and 'refined' gets the host-alone epochs times its speed ratio. All arms load the host's weights
through timm's pretrained path (`--pretrained --model-kwargs pretrained_cfg_overlay={'file': ...}`), so the head is
kept. Curves: top-1 on a fixed validation split carved from the training set (500 images per class, in neither
draw) after every epoch; the test set is read once per run, after training (timm's validate.py).

Runs are resumable (a stopped run continues from its last checkpoint, finished runs are in runs.csv); the script
writes CSV, Markdown and PNG under benchmarks/results/fmnist_layers/ and does not commit them. About 35 minutes of
1-thread CPU in all:

    python benchmarks/fmnist_layers_study.py run --timm-scripts /work/timm-scripts
    python benchmarks/fmnist_layers_study.py report
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_lib import (  # noqa: E402
    REPO, Run, Study, epochs_done, mean_std, plot_bands, read_curve, recorded_runs, run_queue, save_curve,
    shown_command, thread_env, train_images_per_second, train_throughput,
)
from timm_hybrid.compare import markdown_table  # noqa: E402
from timm_hybrid.data import (  # noqa: E402
    FASHION_MNIST_INPUT_SIZE, FASHION_MNIST_MEAN, FASHION_MNIST_NUM_CLASSES, FASHION_MNIST_STD, prepare_fashion_mnist,
)

RESULTS = REPO / 'benchmarks' / 'results' / 'fmnist_layers'
WORK = Path(os.environ.get('TIMM_HYBRID_LAYERS_STUDY_DIR', Path.home() / '.cache' / 'timm-hybrid' / 'fmnist-layers'))

HOST = 'deit_nano_patch7_28'
HYBRID = 'deit_nano_refined_patch7_28'
# fine-tuning arm -> model; the third arm gives the hybrid the host's epochs (more time): the layer's effect per step
ARMS = {'host': HOST, 'refined': HYBRID, 'refined_epochs': HYBRID}
DISPLAY = {'host': 'host alone (deit_nano_patch7_28)', 'refined': 'host + refiner, same time',
           'refined_epochs': 'host + refiner, same epochs (more time)'}
VALIDATION_PER_CLASS = 500
DRAWS = {'host': 0, 'finetune': 1}  # data key -> seed of its 10% draw
TRAIN_IMAGES = 5500
HOST_EPOCHS = 25
FINETUNE_EPOCHS = 20  # host alone; the hybrid: the same training seconds
SEEDS = (0, 1, 2)
SPEED_REPEATS = 11

_NORM = f'--mean {FASHION_MNIST_MEAN[0]} --std {FASHION_MNIST_STD[0]}'
_SIZE = ' '.join(str(s) for s in FASHION_MNIST_INPUT_SIZE)
# the nano study's recipe (AdamW + cosine, mild crop / flip, label smoothing 0.1); fine-tuning at half its lr
RECIPE = (
    f'--device cpu --device-modules timm_hybrid --dataset torch/fashion_mnist --train-split train --val-split test '
    f'--num-classes {FASHION_MNIST_NUM_CLASSES} --input-size {_SIZE} {_NORM} --crop-pct 1.0 '
    f'--batch-size 128 --opt adamw --weight-decay 0.05 --sched cosine --min-lr 1e-5 '
    f'--scale 0.6 1.0 --hflip 0.5 --color-jitter 0 --smoothing 0.1 --workers 1 --log-interval 100 '
    f'--checkpoint-hist 1'
)
HOST_ARGS = ('--lr', '1e-3', '--warmup-epochs', '2')
FINETUNE_ARGS = ('--lr', '5e-4', '--warmup-epochs', '0', '--pretrained')
HOST_WEIGHTS = WORK / 'host.safetensors'

FIELDS = ('run', 'group', 'model', 'data', 'train_images', 'seed', 'epochs', 'train_seconds', 'top1_val',
          'top1_val_best', 'top1_test', 'top5_test', 'gmacs', 'params_m', 'train_img_per_s_compare',
          'train_img_per_s_log', 'threads', 'finished', 'command', 'test_command')


def data_root(data: str, eval_split: str) -> Path:
    """ The layout of a draw whose test files hold the validation split ('validation') or the test set ('test'). """
    root = WORK / 'data' / f'{data}-{eval_split}'
    if not (root / 'FashionMNIST' / 'raw' / 't10k-labels-idx1-ubyte').exists():
        prepare_fashion_mnist(root, train_fraction=0.1, seed=DRAWS[data], validation_per_class=VALIDATION_PER_CLASS,
                              eval_split=eval_split)
    return root


STUDY = Study(results=RESULTS, work=WORK, recipe=RECIPE, fields=FIELDS, data_root=data_root,
              train_images={k: TRAIN_IMAGES for k in DRAWS})
HOST_RUN = Run('host-10pct-s0', 'pretrain', HOST, 'host', 0, HOST_EPOCHS, 5, extra_args=HOST_ARGS)


def speeds() -> Dict[str, float]:
    """ Training img/s of host and hybrid, timed side by side (measured once, kept in compare/). """
    compare_csv = RESULTS / 'compare' / 'compare.csv'
    if not compare_csv.exists():
        from timm_hybrid.compare import SpeedSettings, compare_models
        compare_models([HOST, HYBRID], output_dir=str(compare_csv.parent), references=[HOST],
                       settings=SpeedSettings(threads=1, batch_size=128, repeats=SPEED_REPEATS))
    return train_throughput(compare_csv)


def finetune_epochs(speed: Dict[str, float]) -> Dict[str, int]:
    """ Epochs per arm: the same training seconds as FINETUNE_EPOCHS of the host alone ('refined'), the same
    epochs ('refined_epochs'). """
    return {'host': FINETUNE_EPOCHS, 'refined': max(1, round(FINETUNE_EPOCHS * speed[HYBRID] / speed[HOST])),
            'refined_epochs': FINETUNE_EPOCHS}


def finetune_runs(speed: Dict[str, float]) -> List[Run]:
    epochs = finetune_epochs(speed)
    overlay = f"pretrained_cfg_overlay={{'file': '{HOST_WEIGHTS}'}}"
    return [Run(f'{arm}-finetune-s{seed}', arm, ARMS[arm], 'finetune', seed, epochs[arm], 1,
                model_kwargs=(overlay,), extra_args=FINETUNE_ARGS)
            for seed in SEEDS for arm in ARMS]


def validate_command(run: Run, validate_py: Path) -> List[str]:
    """ timm's validate.py on the run's last checkpoint and the real test set (`timm-hybrid run`). """
    options = {
        '--data-dir': data_root(run.data, 'test'), '--dataset': 'torch/fashion_mnist', '--split': 'test',
        '--model': run.model, '--checkpoint': STUDY.run_dir(run) / 'last.pth.tar',
        '--num-classes': FASHION_MNIST_NUM_CLASSES, '--crop-pct': '1.0', '--device': 'cpu', '--batch-size': 256,
        '--workers': 1, '--results-file': STUDY.run_dir(run) / 'test.json', '--results-format': 'json',
    }
    args = [str(a) for option, value in options.items() for a in (option, value)]
    return [sys.executable, '-m', 'timm_hybrid.cli', 'run', str(validate_py), *args,
            '--input-size', *_SIZE.split(), *_NORM.split()]


def _complexity(model: str) -> Dict[str, object]:
    from timm_hybrid import count_flops
    flops = count_flops(model, input_size=FASHION_MNIST_INPUT_SIZE)
    return dict(gmacs=round(flops.gmacs, 5), params_m=round(flops.mparams, 4))


def finish(run: Run, command: List[str], validate_py: Path, speed: Dict[str, float]) -> Dict[str, object]:
    """ Keeps the curve, reads the test set once, exports the host's weights (host run); the runs.csv row. """
    curve = save_curve(STUDY, run)
    cmd = validate_command(run, validate_py)
    with open(STUDY.run_dir(run) / 'test_log.txt', 'w') as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=thread_env(1), cwd=WORK)
    test = json.loads((STUDY.run_dir(run) / 'test.json').read_text())
    if run.group == 'pretrain':
        from safetensors.torch import save_file
        from timm.models import load_state_dict
        save_file(load_state_dict(str(STUDY.run_dir(run) / 'last.pth.tar'), use_ema=False), str(HOST_WEIGHTS))
    img_s = speed.get(run.model)
    epochs = epochs_done(STUDY, run)
    return dict(
        run=run.name, group=run.group, model=run.model, data=run.data, train_images=TRAIN_IMAGES, seed=run.seed,
        epochs=epochs, train_seconds=round(epochs * TRAIN_IMAGES / img_s, 1) if img_s else '',
        top1_val=float(curve[-1]['eval_top1']), top1_val_best=max(float(r['eval_top1']) for r in curve),
        top1_test=test['top1'], top5_test=test['top5'], **_complexity(run.model),
        train_img_per_s_compare=img_s or '', train_img_per_s_log=train_images_per_second(
            STUDY.run_dir(run) / 'log.txt') or '', threads=1, finished=time.strftime('%Y-%m-%d %H:%M'),
        command=shown_command(command, validate_py.parent),
        test_command=shown_command(cmd, validate_py.parent).replace('python -m timm_hybrid.cli run', 'timm-hybrid run'))


# --- report ----------------------------------------------------------------------------------------------------------

INTRO = (
    f'The host, `{HOST}`, is trained here from scratch on a fixed class-balanced 10% draw of the Fashion-MNIST '
    f'training set ({TRAIN_IMAGES} images, {HOST_EPOCHS} epochs). It is then fine-tuned on another 10% draw (about '
    f'a tenth of its images shared with the host\'s), 3 seeds per arm: alone, and as `{HYBRID}` (every block\'s '
    f'attention maps refined by convolutions and handed on from block to block, `timm_hybrid.layers.'
    f'refine_attention`, the new layers starting as the identity), once for the same training time (the host-alone '
    f'epochs times the hybrid\'s training speed ratio, both speeds timed side by side first) and once for the same '
    f'epochs (more time: what the layer does per step). All start from the host\'s weights through timm\'s '
    f'pretrained path (head kept). Curves: top-1 on a validation split of 500 images per class carved from the '
    f'training set (in neither draw) after every epoch; the test set is read once per run, after training (timm\'s '
    f'validate.py).')


def _values(rows: List[Dict[str, str]], key: str) -> List[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, '')]


def write_report() -> None:
    rows = list(recorded_runs(STUDY).values())
    compare_csv = RESULTS / 'compare' / 'compare.csv'
    speed = train_throughput(compare_csv) if compare_csv.exists() else {}
    host = [r for r in rows if r['group'] == 'pretrain']
    lines = ['# Fashion-MNIST: a refiner inserted into a trained DeiT, fine-tuned for the same time as the host alone',
             '', INTRO, '',
             'Produced by `python benchmarks/fmnist_layers_study.py run --timm-scripts /work/timm-scripts` (every row '
             'of [runs.csv](runs.csv) holds its exact training and test commands; `--data-dir` layouts: '
             '`prepare_fashion_mnist(ROOT, train_fraction=0.1, seed=S, validation_per_class=500, eval_split=E)` from '
             '`timm_hybrid.data`, S 0 for the host, 1 for fine-tuning, E \'validation\' while training, \'test\' for '
             'the test command). ± is the standard deviation over seeds.', '',
             f'Recipe: `{RECIPE}`; host `{" ".join(HOST_ARGS)}`, {HOST_EPOCHS} epochs; fine-tuning '
             f'`{" ".join(FINETUNE_ARGS)}`.', '']
    host_test = float(host[0]['top1_test']) if host else None
    if host:
        lines += [f'Host after its {host[0]["epochs"]} epochs: validation top-1 {host[0]["top1_val"]}, test top-1 '
                  f'{host[0]["top1_test"]} (`{HOST}`, {host[0]["gmacs"]} GMACs).', '']
    table = []
    for arm in ARMS:
        mine = [r for r in rows if r['group'] == arm]
        if mine:
            test = _values(mine, 'top1_test')
            table.append({
                'fine-tuning': DISPLAY[arm], 'epochs': mine[0]['epochs'],
                'training s': mine[0]['train_seconds'], 'GMACs': mine[0]['gmacs'], 'params (M)': mine[0]['params_m'],
                'train img/s': mine[0]['train_img_per_s_compare'],
                'val top-1 (last epoch)': mean_std(_values(mine, 'top1_val')), 'test top-1': mean_std(test),
                'test top-1 vs host before': f'{statistics.mean(test) - host_test:+.2f}' if host_test else '-'})
    lines += ['## Fine-tuned from the host, 3 seeds', '',
              markdown_table(table) if table else '(no fine-tuning run finished yet)', '',
              'Training seconds: epochs x 5500 images / the model\'s training img/s below (1 thread, batch 128, '
              'timed side by side: [compare/](compare/compare.md)): ' +
              (', '.join(f'{m} {v:.0f}' for m, v in speed.items()) or 'not measured yet') + '.', '']
    curves = {arm: [read_curve(STUDY, r['run']) for r in rows if r['group'] == arm] for arm in ARMS}
    curves = {arm: c for arm, c in curves.items() if c}
    if curves:
        plot_bands(RESULTS / 'top1_per_epoch.png', [('fine-tuning', {DISPLAY[a]: c for a, c in curves.items()})],
                   'epoch', 'validation top-1 (%)', 'mean over seeds, band = range')
        lines += ['![validation top-1 per epoch](top1_per_epoch.png)', '']
    if curves and speed:
        per_second = {DISPLAY[a]: [[(e * TRAIN_IMAGES / speed[ARMS[a]], v) for e, v in seed_curve] for seed_curve in c]
                      for a, c in curves.items()}
        plot_bands(RESULTS / 'top1_per_second.png', [('fine-tuning', per_second)],
                   'training seconds (1 thread, compare img/s)', 'validation top-1 (%)',
                   'mean over seeds, band = range')
        lines += ['![validation top-1 per training second](top1_per_second.png)', '']
    (RESULTS / 'README.md').write_text('\n'.join(lines) + '\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('command', choices=('run', 'report'),
                        help='run: what is not recorded yet (host, timing, fine-tuning), then the report; report: '
                             're-render README.md and the plots from runs.csv')
    parser.add_argument('--timm-scripts', type=Path, default=Path(os.environ.get('TIMM_SCRIPTS', '/work/timm-scripts')),
                        help="folder holding timm's train.py and validate.py (not in the timm wheel)")
    args = parser.parse_args()
    if args.command == 'report':
        return write_report()
    scripts = args.timm_scripts
    if not all((scripts / name).exists() for name in ('train.py', 'validate.py')):
        sys.exit(f'{scripts} lacks train.py / validate.py (timm\'s scripts are not in the wheel)')
    WORK.mkdir(parents=True, exist_ok=True)
    speed: Dict[str, float] = {}

    def finish_run(run: Run, command: List[str]) -> Dict[str, object]:
        return finish(run, command, scripts / 'validate.py', speed)

    speed.update(speeds())  # first, with the machine as quiet as this study leaves it
    run_queue(STUDY, [HOST_RUN], scripts / 'train.py', finish_run)
    if HOST_WEIGHTS.exists():
        run_queue(STUDY, finetune_runs(speed), scripts / 'train.py', finish_run)
    write_report()


if __name__ == '__main__':
    main()
