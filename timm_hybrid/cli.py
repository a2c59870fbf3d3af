""" `timm-hybrid` console script.

Each sub-command is a thin argparse front for a public function of the package; `add_<name>_parser(subparsers)`
registers one.
"""
import argparse
import sys
from typing import List, Optional

DEFAULT_COMPARE_MODELS = (
    'deit_tiny_patch16_224', 'tnt_ti_patch16_224', 'cnt_ti_patch16_224',
    'deit_small_patch16_224', 'tnt_s_patch16_224', 'cnt_s_patch16_224',
    'deit_base_patch16_224', 'tnt_b_patch16_224', 'cnt_b_patch16_224',
    'transcnn_small', 'hatnet_small', 'refiner_vit_small_patch16_224',
)

SWEEP_MODELS = ('cnt_s_patch16_224', 'tnt_s_patch16_224', 'deit_small_patch16_224')


def _compare(args: argparse.Namespace) -> int:
    from .compare import compare_models, resolution_sweep
    compare_models(args.models or list(DEFAULT_COMPARE_MODELS), output_dir=args.output, quick=not args.full,
                   speed=not args.no_speed, threads=args.threads, batch_size=args.batch_size,
                   references=args.references, repeats=args.repeats)
    if args.full and not args.no_speed:
        # the sweep re-creates models at img_size 224..448: only the requested 224 px models (the S trio by default);
        # the 28 px study models have no resolution to sweep
        names = SWEEP_MODELS if not args.models else [n for n in args.models if n.endswith('_224')]
        if names:
            resolution_sweep(names, output_dir=args.output, threads=args.threads)
    return 0


def add_compare_parser(subparsers) -> None:
    from .compare import REFERENCES
    p = subparsers.add_parser(
        'compare', help='params, fvcore GMACs and CPU speed of CNT vs TNT vs DeiT (table, CSV, Markdown, PNG)')
    p.add_argument('--models', nargs='+',
                   help='timm model names (default: CNT / TNT / DeiT Ti, S, B and the small TransCNN, HAT-Net, '
                        'Refiner)')
    p.add_argument('--references', nargs='+', default=list(REFERENCES),
                   help='models the speed ratios are taken to, timed in the same rounds (default: TNT-S, DeiT-S; '
                        'for the 28 px models e.g. tnt_nano_patch7_28 deit_nano_patch7_28)')
    p.add_argument('--output', default='benchmarks/results/compare', help='output folder')
    p.add_argument('--full', action='store_true',
                   help='full timing: more repeats, train step, and a 224-448 px resolution sweep of the requested '
                        '224 px models')
    p.add_argument('--no-speed', action='store_true', help='params and GMACs only')
    p.add_argument('--threads', type=int, default=2, help='torch threads for timing')
    p.add_argument('--batch-size', type=int, default=32, help='batch size for timing')
    p.add_argument('--repeats', type=int, default=None,
                   help='interleaved timing rounds (default 3, or 7 with --full); short steps such as the 28 px '
                        'models on a shared machine need more for a stable median')
    p.set_defaults(func=_compare)


def _data(args: argparse.Namespace) -> int:
    from .data import FashionMNISTMissing, prepare_fashion_mnist
    try:
        counts = prepare_fashion_mnist(
            args.root, source=args.source, train_fraction=args.train_fraction, seed=args.seed)
    except FashionMNISTMissing as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'Fashion-MNIST laid out in {args.root} ({counts["train"]} train / {counts["test"]} test images); '
          f'use: --dataset torch/fashion_mnist --data-dir {args.root} --val-split test')
    return 0


def add_data_parser(subparsers) -> None:
    from .data import DEBIAN_FASHION_MNIST_DIR
    p = subparsers.add_parser('data', help='lay out a data set for timm (offline)')
    p.add_argument('dataset', choices=['fashion-mnist'])
    p.add_argument('--root', required=True, help='folder to give timm as --data-dir')
    p.add_argument('--source', default=str(DEBIAN_FASHION_MNIST_DIR), help='folder with the IDX(.gz) files')
    p.add_argument('--train-fraction', type=float, default=None, help='keep a class-balanced fraction of train')
    p.add_argument('--seed', type=int, default=0, help='seed of the train subset')
    p.set_defaults(func=_data)


def _usage_error(error) -> int:
    """ What the user can fix (a wrong name, a missing file or token): one line on stderr, exit code 2. """
    print(f'error: {error}', file=sys.stderr)
    return 2


def _export(args: argparse.Namespace) -> int:
    from .hub import ExportError, export
    card_data = dict(accuracy=args.accuracy, train_command=args.train_command, compare=args.compare or ())
    if args.model_name:
        card_data['model_name'] = args.model_name
    if args.dataset:
        card_data['dataset'] = args.dataset
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in (
        ('input_size', args.input_size), ('mean', args.mean), ('std', args.std), ('crop_pct', args.crop_pct))
        if v is not None}
    try:
        folder = export(args.model, args.checkpoint, args.output, num_classes=args.num_classes,
                        in_chans=args.in_chans, model_args=args.model_kwargs, card_data=card_data,
                        use_ema=args.use_ema, data_config=data_config)
    except ExportError as e:
        return _usage_error(e)
    print(f'{args.model} exported to {folder} ({", ".join(sorted(p.name for p in folder.iterdir()))}); '
          f"load it with timm.create_model('local-dir:{folder}', pretrained=True)")
    return 0


def add_export_parser(subparsers) -> None:
    from timm.utils import ParseKwargs
    p = subparsers.add_parser(
        'export', help='timm training checkpoint -> hub folder (config.json, model.safetensors, README.md card)')
    p.add_argument('model', help="timm model name the checkpoint was trained as (e.g. cnt_nano_patch7_28.fmnist)")
    p.add_argument('--checkpoint', required=True, help='model_best.pth.tar / last.pth.tar / .safetensors')
    p.add_argument('--output', required=True, help='folder to write, by convention named <arch>.<tag>')
    p.add_argument('--num-classes', type=int, default=None, help='classes of the trained head, if not the default')
    p.add_argument('--in-chans', type=int, default=None, help='input channels, if not the default')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='further create_model kwargs the model was trained with, e.g. img_size=56')
    p.add_argument('--use-ema', action='store_true', help="export the checkpoint's EMA weights (--model-ema)")
    # the data settings of timm's train.py, when the model was trained with others than its cfg's
    p.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                   help='input size the model was trained at, e.g. 1 28 28')
    p.add_argument('--mean', type=float, nargs='+', default=None, help='normalisation mean used in training')
    p.add_argument('--std', type=float, nargs='+', default=None, help='normalisation std used in training')
    p.add_argument('--crop-pct', type=float, default=None, help='eval crop fraction used in training')
    p.add_argument('--accuracy', nargs='*', default={}, action=ParseKwargs, metavar='METRIC=VALUE',
                   help='measured accuracy for the model card, e.g. top1=88.1 top5=99.7 (validate.py, in %%)')
    p.add_argument('--train-command', default=None, help='the command that trained the weights, for the card')
    p.add_argument('--dataset', default=None, help='data set name for the card (default from the tag)')
    p.add_argument('--compare', nargs='*', default=None, metavar='MODEL',
                   help='other models for the card comparison table (params, GMACs)')
    p.add_argument('--model-name', default=None, help='repo name in the card (default <arch>.<tag>)')
    p.set_defaults(func=_export)


def _push(args: argparse.Namespace) -> int:
    from .hub import HubTokenMissing, push
    try:
        commit = push(args.folder, args.repo_id, token=args.token, private=args.private,
                      commit_message=args.commit_message)
    except (HubTokenMissing, FileNotFoundError) as e:
        return _usage_error(e)
    print(f'pushed {args.folder} to {args.repo_id}: {getattr(commit, "commit_url", commit)}')
    return 0


def add_push_parser(subparsers) -> None:
    p = subparsers.add_parser('push', help='upload an exported folder to a Hugging Face Hub repo')
    p.add_argument('folder', help='folder written by `timm-hybrid export`')
    p.add_argument('--repo-id', required=True, help='ORG/NAME, e.g. timm-hybrid/cnt_nano_patch7_28.fmnist')
    p.add_argument('--token', default=None, help='Hugging Face token (default: HF_TOKEN or `hf auth login`)')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--commit-message', default='Add model', help='commit message of the upload')
    p.set_defaults(func=_push)


def _run(args: argparse.Namespace) -> int:
    import runpy
    from pathlib import Path

    # this module's package, timm_hybrid, is imported by now: every family is registered before the script runs
    script = Path(args.script).resolve()
    if not script.is_file():
        return _usage_error(f'no script {args.script}')
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *args.script_args]
    sys.path.insert(0, str(script.parent))  # as `python SCRIPT` does, for the script's own imports
    try:
        runpy.run_path(str(script), run_name='__main__')
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


def add_run_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'run', help="run a script (timm's validate.py, benchmark.py, inference.py) with our models registered")
    p.add_argument('script', help='python script, run as __main__')
    p.add_argument('script_args', nargs=argparse.REMAINDER, help="the script's own arguments")
    p.set_defaults(func=_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-hybrid', description=__doc__.strip().splitlines()[0])
    subparsers = parser.add_subparsers(dest='command', required=True)
    add_compare_parser(subparsers)
    add_data_parser(subparsers)
    add_export_parser(subparsers)
    add_push_parser(subparsers)
    add_run_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
