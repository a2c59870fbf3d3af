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
)


def _compare(args: argparse.Namespace) -> int:
    from .compare import compare_models
    compare_models(args.models or list(DEFAULT_COMPARE_MODELS), output_dir=args.output, quick=not args.full,
                   speed=not args.no_speed, threads=args.threads, batch_size=args.batch_size)
    return 0


def add_compare_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'compare', help='params, fvcore GMACs and CPU speed of CNT vs TNT vs DeiT (table, CSV, Markdown, PNG)')
    p.add_argument('--models', nargs='+', help='timm model names (default: the CNT / TNT / DeiT Ti, S and B sizes)')
    p.add_argument('--output', default='benchmarks/results/compare', help='output folder')
    p.add_argument('--full', action='store_true', help='full timing (more repeats, train step, resolution sweep)')
    p.add_argument('--no-speed', action='store_true', help='params and GMACs only')
    p.add_argument('--threads', type=int, default=2, help='torch threads for timing')
    p.add_argument('--batch-size', type=int, default=32, help='batch size for timing')
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-hybrid', description=__doc__.strip().splitlines()[0])
    subparsers = parser.add_subparsers(dest='command', required=True)
    add_compare_parser(subparsers)
    add_data_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
