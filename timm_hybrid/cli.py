""" timm-hybrid: CNT, TransCNN / HAT-Net and Refiner-ViT for timm; compare them, export and push weights.

Each sub-command is a thin argparse front for a public function of the package, listed in `COMMANDS`.
"""
import argparse
import ast
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple


class ArgumentParser(argparse.ArgumentParser):
    """ argparse with the CLI's one error convention: one line on stderr, exit code 2 (argparse's own error prints
    the usage block first). """

    def error(self, message: str):
        self.exit(2, f'error: {self.prog}: {message} (see {self.prog} --help)\n')


def _number(kind: Callable[[str], Any], minimum: float, inclusive: bool = True, maximum: Optional[float] = None):
    """ An argparse type: `kind(text)` within [minimum, maximum] (or above minimum); 0 is a value, never a default. """
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {"an integer" if kind is int else "a number"}')
        if not math.isfinite(value) or (value < minimum if inclusive else value <= minimum) or (
                maximum is not None and value > maximum):
            bound = f'>= {minimum}' if inclusive else f'> {minimum}'
            raise argparse.ArgumentTypeError(
                f'{text} is out of range: it must be {bound}{f" and <= {maximum}" if maximum is not None else ""}')
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = _number(int, 1)
NON_NEGATIVE_INT = _number(int, 0)
POSITIVE_FLOAT = _number(float, 0, inclusive=False)
FRACTION = _number(float, 0, inclusive=False, maximum=1)


class KeyValues(argparse.Action):
    """ KEY=VALUE pairs into a dict, values as Python literals (else strings), as timm's ParseKwargs, but a word
    without '=' is a usage error instead of a traceback. With `percent=True` values must be numbers in [0, 100]. """

    def __init__(self, *args, percent: bool = False, **kwargs):
        self.percent = percent
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        pairs = {}
        for item in values:
            key, sep, text = item.partition('=')
            if not sep or not key:
                raise argparse.ArgumentError(self, f'{item!r} is not KEY=VALUE')
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a plain word, e.g. act_layer=gelu
            if self.percent and (isinstance(value, bool) or not isinstance(value, (int, float))
                                 or not 0 <= value <= 100):
                raise argparse.ArgumentError(self, f'{item!r}: the value must be a percentage in [0, 100]')
            pairs[key] = value
        setattr(namespace, self.dest, pairs)


def _compare(args: argparse.Namespace) -> int:
    print('timm-hybrid compare: importing torch, timm and fvcore', file=sys.stderr, flush=True)  # seconds of silence
    from . import compare
    import timm
    try:
        specs = [compare.parse_model_spec(n) for n in (args.models or []) + (args.references or [])]
    except ValueError as e:
        return _usage_error(e)
    unknown = [name for name, _ in specs if not timm.is_model(name)]
    if unknown:
        return _usage_error(f'unknown model(s): {", ".join(unknown)} (timm.list_models() lists them)')
    try:
        settings = compare.SpeedSettings.defaults(
            full=args.full, device=args.device, batch_size=args.batch_size, repeats=args.repeats,
            threads=args.threads, amp=args.amp, compile=args.compile or None, channels_last=args.channels_last or None,
            settle_steps=args.settle_steps, malloc=args.malloc)
    except ValueError as e:
        return _usage_error(e)
    progress = compare.Progress()
    output = args.output or compare.DEFAULT_OUTPUT
    names = args.models or list(compare.FULL_MODELS if args.full else compare.QUICK_MODELS)
    try:
        rows = compare.compare_models(names, output_dir=output, settings=settings, speed=not args.no_speed,
                                      references=args.references or compare.REFERENCES, progress=progress)
        print(f'\n{compare.markdown_table(rows)}\n')
        if args.full and not args.no_speed:
            # the sweep re-creates models at img_size 224..448: only the requested 224 px models (the S trio by
            # default); the 28 px study models have no resolution to sweep
            swept = compare.SWEEP_MODELS if not args.models else [
                n for n in args.models if compare.parse_model_spec(n)[0].endswith('_224')]
            if swept:
                sweep = compare.resolution_sweep(swept, output_dir=output, progress=progress, settings=(
                    dataclasses.replace(settings, batch_size=8, repeats=3)))
                print(f'{compare.markdown_table(sweep)}\n')
    except compare.ModelSpecError as e:
        return _usage_error(e)
    except KeyboardInterrupt:
        print(f'interrupted: what was measured is in {Path(output).resolve()}', file=sys.stderr)
        return 130
    print(f'Settings: {settings.describe() if not args.no_speed else "params and GMACs only"}')
    print(f'Written to {Path(output).resolve()} (CSV, Markdown, JSON, PNG).')
    if not args.full and not args.models:
        print('Quick run: the matched S trio, small batch, few repeats. Full tables (CNT / TNT / DeiT Ti, S, B, '
              'TransCNN, HAT-Net, Refiner; batch 32, 7 repeats; 224-448 px sweep): timm-hybrid compare --full')
    # the others were timed on; the `error` column says what failed, and the exit status that something did
    failed = [f'{r["model"]} ({r["error"]})' for r in rows if 'error' in r]
    if failed:
        print('failed: ' + '; '.join(failed), file=sys.stderr)
        return 1
    return 0


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--models', nargs='+',
                   help='timm model names, or NAME:KEY=VALUE[,KEY=VALUE...] to build one with those model kwargs '
                        '(e.g. cnt_ti_patch16_224:inner_impl=matmul; variants of one model time side by side) '
                        '(default: the matched S trio CNT-S, TNT-S, DeiT-S; with --full CNT / TNT / '
                        'DeiT Ti, S, B and the small TransCNN, HAT-Net, Refiner)')
    p.add_argument('--references', nargs='+', default=None,
                   help='models the speed ratios are taken to, timed in the same rounds (default: TNT-S, DeiT-S; '
                        'for the 28 px models e.g. tnt_nano_patch7_28 deit_nano_patch7_28)')
    p.add_argument('--output', default=None,
                   help='output folder (default: timm-hybrid-results/compare in the current folder)')
    p.add_argument('--full', action='store_true',
                   help='the real tables: the twelve default models, batch 32, 7 repeats, and a 224-448 px '
                        'resolution sweep of the requested 224 px models (hours on 2 CPU cores)')
    p.add_argument('--no-speed', action='store_true', help='params and GMACs only')
    p.add_argument('--device', default='cpu', help='cpu or cuda (default: %(default)s)')
    p.add_argument('--amp', choices=['bf16', 'fp16'], default=None, help='autocast to this dtype (default: float32)')
    p.add_argument('--compile', action='store_true', help='time torch.compile(model) (inductor)')
    p.add_argument('--channels-last', action='store_true', help='model and input in channels-last memory format')
    p.add_argument('--threads', type=POSITIVE_INT, default=None,
                   help="torch threads (default: torch's thread count capped by the cores the 1-minute load "
                        'average leaves free, at least 1)')
    p.add_argument('--batch-size', type=POSITIVE_INT, default=None,
                   help='batch size for timing (default 8; 32 with --full; 256 on cuda)')
    p.add_argument('--repeats', type=POSITIVE_INT, default=None,
                   help='interleaved timing rounds (default 3, or 7 with --full); short steps such as the 28 px '
                        'models on a shared machine need more for a stable median')
    p.add_argument('--malloc', choices=['default', 'keep'], default=None,
                   help="CPU, glibc: 'keep' tells malloc to keep freed memory (mmap above 256 MiB only, no trimming) "
                        'so that no step page-faults its tensors in anew: the models\' own compute, without the '
                        "fault noise that moves CPU ratios between runs (default: glibc's behaviour, what a user's "
                        'process gets)')
    p.add_argument('--settle-steps', type=NON_NEGATIVE_INT, default=None,
                   help='untimed steps of the same model before each timed one (default 1: as in timm\'s '
                        'benchmark.py, a timed step follows a step of its own model, not another model\'s)')


def _data(args: argparse.Namespace) -> int:
    from .data import FashionMNISTMissing, prepare_fashion_mnist
    try:
        counts = prepare_fashion_mnist(
            args.root, source=args.source, train_fraction=args.train_fraction, seed=args.seed)
    except (FashionMNISTMissing, ValueError) as e:
        return _usage_error(e)
    print(f'Fashion-MNIST laid out in {args.root} ({counts["train"]} train / {counts["test"]} test images); '
          f'use: --dataset torch/fashion_mnist --data-dir {args.root} --val-split test')
    return 0


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    from .data import DEBIAN_FASHION_MNIST_DIR
    p.add_argument('dataset', choices=['fashion-mnist'])
    p.add_argument('--root', required=True, help='folder to give timm as --data-dir')
    p.add_argument('--source', default=str(DEBIAN_FASHION_MNIST_DIR), help='folder with the IDX(.gz) files')
    p.add_argument('--train-fraction', type=FRACTION, default=None,
                   help='keep a class-balanced fraction of train, in (0, 1]')
    p.add_argument('--seed', type=NON_NEGATIVE_INT, default=0, help='seed of the train subset')


def _flops(args: argparse.Namespace) -> int:
    from . import models  # noqa: F401  registers the architectures named
    from .flops import UncountedOpError, count_flops
    input_size = tuple(args.input_size) if args.input_size else None
    for name in args.models:
        try:
            f = count_flops(name, input_size=input_size, strict=not args.allow_uncounted, **args.model_kwargs)
        except UncountedOpError as e:
            return _usage_error(f'{e} (--allow-uncounted reports it and goes on)')
        except (TypeError, ValueError) as e:  # a --model-kwargs entry the model does not take, or out of range
            return _usage_error(f'{name}: {e}')
        except RuntimeError as e:
            if 'Unknown model' not in str(e):
                raise
            return _usage_error(e)
        c, h, w = f.input_size
        print(f'{name}: {f.mparams:.3f} M params, {f.gmacs:.5f} GMACs per {c}x{h}x{w} image '
              f'(fvcore, 1 multiply-add = 1; training step ~{f.train_gmacs:.5f})')
        width = max(len(op) for op in f.by_operator) if f.by_operator else 8
        for op, gmacs in sorted(f.by_operator.items(), key=lambda kv: -kv[1]):
            print(f'  {op:<{width}}  {gmacs:10.5f}  {100 * gmacs / f.gmacs:5.1f} %')
        if f.unsupported:
            print(f'  not counted (no fvcore handle): {", ".join(sorted(f.unsupported))}')
    return 0


def add_flops_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('models', nargs='+', metavar='MODEL', help='timm model names, e.g. cnt_nano_patch7_28')
    p.add_argument('--input-size', type=POSITIVE_INT, nargs=3, default=None, metavar=('C', 'H', 'W'),
                   help="input image size (default: the model's own, e.g. 1 28 28 for the 28 px models)")
    p.add_argument('--model-kwargs', nargs='*', default={}, action=KeyValues,
                   help='create_model kwargs, e.g. img_size=56 depth=4')
    p.add_argument('--allow-uncounted', action='store_true',
                   help='report ops fvcore cannot count instead of failing')


def _usage_error(error) -> int:
    """ What the user can fix (a wrong name, a missing file or token): one line on stderr, exit code 2. """
    print('error: ' + ' '.join(str(error).split()), file=sys.stderr)  # the error's own line breaks folded
    return 2


def _export(args: argparse.Namespace) -> int:
    from . import models  # noqa: F401  registers the architectures a checkpoint names
    from .hub import ExportError, export
    card_data = dict(accuracy=args.accuracy, train_command=args.train_command, compare=args.compare or ())
    if args.model_name:
        card_data['model_name'] = args.model_name
    if args.dataset:
        card_data['dataset'] = args.dataset
    if args.teacher:
        card_data['teacher'] = args.teacher
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in (
        ('input_size', args.input_size), ('mean', args.mean), ('std', args.std), ('crop_pct', args.crop_pct))
        if v is not None}
    try:
        folder = export(args.model, args.checkpoint, args.output, num_classes=args.num_classes,
                        in_chans=args.in_chans, model_args=args.model_kwargs, card_data=card_data,
                        use_ema=args.use_ema, data_config=data_config, overwrite=args.overwrite)
    except ExportError as e:
        return _usage_error(e)
    print(f'{args.model} exported to {folder} ({", ".join(sorted(p.name for p in folder.iterdir()))}); '
          f"load it with timm.create_model('local-dir:{folder}', pretrained=True)")
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('model', help="timm model name the checkpoint was trained as (e.g. cnt_nano_patch7_28.fmnist)")
    p.add_argument('--checkpoint', required=True, help='model_best.pth.tar / last.pth.tar / .safetensors')
    p.add_argument('--output', required=True, help='folder to write, by convention named <arch>.<tag>')
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty --output folder as a whole')
    model = p.add_argument_group('the model as trained, where not its defaults')
    model.add_argument('--num-classes', type=NON_NEGATIVE_INT, default=None, help='classes of the trained head')
    model.add_argument('--in-chans', type=POSITIVE_INT, default=None, help='input channels')
    model.add_argument('--model-kwargs', nargs='*', default={}, action=KeyValues,
                       help='further create_model kwargs the model was trained with, e.g. img_size=56')
    model.add_argument('--use-ema', action='store_true', help="export the checkpoint's EMA weights (--model-ema)")
    data = p.add_argument_group("data settings of timm's train.py, where not the model cfg's (go into config.json)")
    data.add_argument('--input-size', type=POSITIVE_INT, nargs=3, default=None, metavar=('C', 'H', 'W'),
                      help='input size the model was trained at, e.g. 1 28 28')
    data.add_argument('--mean', type=float, nargs='+', default=None, help='normalisation mean used in training')
    data.add_argument('--std', type=POSITIVE_FLOAT, nargs='+', default=None, help='normalisation std used in training')
    data.add_argument('--crop-pct', type=POSITIVE_FLOAT, default=None, help='eval crop fraction used in training')
    card = p.add_argument_group('model card')
    card.add_argument('--accuracy', nargs='*', default={}, action=KeyValues, percent=True, metavar='METRIC=VALUE',
                      help='measured accuracy, e.g. top1=88.1 top5=99.7 (validate.py, in %%)')
    card.add_argument('--train-command', default=None, help='the command that trained the weights')
    card.add_argument('--dataset', default=None, help='data set name (default from the tag)')
    card.add_argument('--compare', nargs='*', default=None, metavar='MODEL',
                      help='other models for the comparison table (params, GMACs)')
    card.add_argument('--model-name', default=None, help='repo name (default <arch>.<tag>)')
    card.add_argument('--teacher', default=None, metavar='REPO_ID',
                      help="a distilled student's teacher on the hub: the card's base_model")


def _push(args: argparse.Namespace) -> int:
    from .hub import HubTokenMissing, PushError, push
    try:
        commit = push(args.folder, args.repo_id, token=args.token, private=args.private,
                      commit_message=args.commit_message)
    except (HubTokenMissing, FileNotFoundError, PushError) as e:
        return _usage_error(e)
    print(f'pushed {args.folder} to {args.repo_id}: {getattr(commit, "commit_url", commit)}')
    return 0


def add_push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('folder', help='folder written by `timm-hybrid export`')
    p.add_argument('--repo-id', required=True, help='ORG/NAME, e.g. timm-hybrid/cnt_nano_patch7_28.fmnist')
    upload = p.add_argument_group('the upload')
    upload.add_argument('--token', default=None, help='Hugging Face token (default: HF_TOKEN or `hf auth login`)')
    upload.add_argument('--private', action='store_true', help='create the repo private')
    upload.add_argument('--commit-message', default='Add model', help='commit message of the upload')


def _publish(args: argparse.Namespace) -> int:
    from . import models  # noqa: F401  registers the tags to publish
    from .hub import HubTokenMissing, publish
    sources = {}
    for item in args.source or ():
        tag, sep, path = item.partition('=')
        if not sep or not path:
            return _usage_error(f'--source takes TAG=PATH, got {item!r}')
        sources[tag] = path
    try:
        results = publish(tags=args.tags, sources=sources, output_dir=args.output, dry_run=args.dry_run,
                          token=args.token, org=args.org, private=args.private)
    except (ValueError, HubTokenMissing, FileNotFoundError) as e:
        return _usage_error(e)
    for result in results:
        print(result.describe())
    if args.dry_run:
        print('dry run: nothing pushed')
    return 1 if any(r.status == 'mismatch' for r in results) else 0


def add_publish_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--tags', nargs='+', default=None, metavar='TAG',
                   help='only these tags (default: every packaged weight folder and official checkpoint)')
    p.add_argument('--source', nargs='+', default=None, metavar='TAG=PATH',
                   help="an official checkpoint downloaded by hand (default: timm's download cache of its url)")
    p.add_argument('--output', default=None, help='folder for the hub folders (default: a temporary one)')
    p.add_argument('--dry-run', action='store_true', help='write and check every folder, push nothing')
    p.add_argument('--org', default='timm-hybrid', help='hub organisation of the repos (default: %(default)s)')
    p.add_argument('--token', default=None, help='Hugging Face token (default: HF_TOKEN or `hf auth login`)')
    p.add_argument('--private', action='store_true', help='create the repos private')


def _run(args: argparse.Namespace) -> int:
    import runpy
    from pathlib import Path

    from . import models  # noqa: F401  every family is registered before the script runs
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


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('script', help='python script, run as __main__')
    p.add_argument('script_args', nargs=argparse.REMAINDER, help="the script's own arguments")


# name: (one line for `timm-hybrid --help`, adds the arguments, runs it)
COMMANDS: Dict[str, Tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    'compare': ('CNT vs TNT vs DeiT: params, GMACs, speed, memory (--full: all)', add_compare_arguments, _compare),
    'data': ('lay out Fashion-MNIST for timm, offline', add_data_arguments, _data),
    'export': ('training checkpoint -> hub folder: config, weights, model card', add_export_arguments, _export),
    'flops': ('params and fvcore GMACs by operator, at the model input size', add_flops_arguments, _flops),
    'publish': ('maintainers: check and push every tag\'s weights to the hub', add_publish_arguments, _publish),
    'push': ('upload an exported folder to a Hugging Face Hub repo', add_push_arguments, _push),
    'run': ("run timm's validate.py, benchmark.py, ... with our models", add_run_arguments, _run),
}


def build_parser(commands: Iterable[str] = COMMANDS) -> argparse.ArgumentParser:
    """ The `timm-hybrid` parser. Only the sub-commands in `commands` get their arguments: some defaults import
    torch or timm (seconds), which `timm-hybrid --help` and the other sub-commands need not wait for. """
    from . import __version__
    parser = ArgumentParser(prog='timm-hybrid', description=__doc__.strip().splitlines()[0])
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    subparsers = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name, (help_line, add_arguments, run) in COMMANDS.items():
        p = subparsers.add_parser(name, help=help_line, description=help_line)
        p.set_defaults(func=run)
        if name in commands:
            add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the sub-command is the first word that names one: no top-level option takes a value
    chosen = next((a for a in argv if not a.startswith('-')), None)
    args = build_parser([chosen] if chosen in COMMANDS else ()).parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
