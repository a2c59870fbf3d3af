""" The matched-size trios (CNT / TNT / DeiT at Ti, S, B) and the three hybrid families, on whatever device is here.

    python benchmarks/device_benchmark.py                 # -> benchmarks/results/<device>/
    python benchmarks/device_benchmark.py --sizes s       # one size group
    python benchmarks/device_benchmark.py --sizes s ti b --no-memory   # within a 15-minute GPU lease (~5 min)
    python benchmarks/device_benchmark.py --sizes s ti b --no-memory --profile   # + PROFILE_TARGETS' profiles
    python benchmarks/device_benchmark.py --sizes s --profile cnt_s_patch16_224 refiner_vit_small_patch16_224
    python benchmarks/device_benchmark.py --models cnt_nano_patch7_28 tnt_nano_patch7_28 \\
        --reference deit_nano_patch7_28 --output /tmp/smoke   # a quick check that it runs

On a GPU: bf16 autocast, batch 256 (timm's benchmark.py `--amp --amp-dtype bfloat16 -b 256`), 20 timed steps after 5
warm-up ones (no settling step between models), and the S group with GPU_VARIANTS (the alternatives of the choices
made for GPUs). On an H200 the S group took 6.5 minutes, half of it measuring peak memory (`--no-memory` skips it).
On a CPU: float32, batch 32, 7 repeats, `free_cpu_threads()` threads. Each size group is timed interleaved with the
DeiT of its size (the hybrid families with DeiT-S), so every `x DeiT` ratio comes from shared rounds. Writes,
through `timm_hybrid.compare`:
`<size>.csv/.md/.json/.png` per group (compare_models), and `benchmark.csv/.md/.json` (all models, ratios to the DeiT
of their size) with `speed_vs_gmacs.png`, rewritten after each group; with `--profile`, one profiled training step of
each model named (`profile_step.py`, the same settings) in `profile/`.

A model that fails (out of memory, a kernel or compile error) does not end the run: its row gets timm's `error` column
and the others go on, as does a failed profile; the exit status is then 1. On a lent GPU machine
`benchmarks/device_run.sh` runs this in one call and packs the results (README, "Speed on a GPU").
"""
import argparse
import re
import sys
from pathlib import Path
from typing import Dict, Sequence, Tuple

import torch

from profile_step import profile_step, write_profile
from timm_hybrid.compare import (
    MALLOC_SETTINGS, Progress, SpeedSettings, compare_models, device_folder_name, error_line, free_cpu_threads,
    plot_speed_vs_gmacs, processor_name, reference_short_name, write_results,
)

RESULTS = Path(__file__).resolve().parent / 'results'
# size: (models, the DeiT they are timed against), in the default order of a run: S first (the targets are
# at S, and a run cut by a lease's limit keeps what it finished)
SIZE_GROUPS = {
    's': (('cnt_s_patch16_224', 'tnt_s_patch16_224', 'deit_small_patch16_224',
           'transcnn_small', 'hatnet_small', 'refiner_vit_small_patch16_224'), 'deit_small_patch16_224'),
    'ti': (('cnt_ti_patch16_224', 'tnt_ti_patch16_224', 'deit_tiny_patch16_224'), 'deit_tiny_patch16_224'),
    'b': (('cnt_b_patch16_224', 'tnt_b_patch16_224', 'deit_base_patch16_224'), 'deit_base_patch16_224'),
}
# On a GPU the S group also times the settings that the models pick there against their alternatives (model specs,
# same rounds): CNT's inner block as GEMMs (`inner_impl='auto'`) vs as convolutions (a draw on an H200: 0.520 / 0.601
# against 0.556 / 0.578x DeiT-S); CNT's outer MLP activations kept for backward (`recompute_mlp_act='cpu'`) vs
# recomputed (0.601 against 0.567 training); Refiner's BatchNorm statistics per image first (`refine_image_stats`, by
# reasoning from the H200 profile, unmeasured) vs aten's. The layouts measured once on the H200 (Refiner's
# channels-last refinement 2.05x training, HAT-Net's channels-last maps 1.56x / 1.74x) are no longer re-timed.
# what `--profile` with no names profiles: the models of the GPU targets (CNT-S and Refiner-S against DeiT-S)
PROFILE_TARGETS = ('cnt_s_patch16_224', 'deit_small_patch16_224', 'refiner_vit_small_patch16_224')
GPU_VARIANTS = {'s': ('cnt_s_patch16_224:inner_impl=conv', 'cnt_s_patch16_224:recompute_mlp_act=True',
                      'refiner_vit_small_patch16_224:refine_image_stats=False')}


def size_groups(sizes: Sequence[str], on_gpu: bool) -> Dict[str, Tuple[Tuple[str, ...], str]]:
    """ The size groups to time, {size: (models, their DeiT)}; on a GPU with the GPU_VARIANTS of each. """
    return {s: (SIZE_GROUPS[s][0] + (GPU_VARIANTS.get(s, ()) if on_gpu else ()), SIZE_GROUPS[s][1]) for s in sizes}


def device_settings(args: argparse.Namespace) -> SpeedSettings:
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    on_gpu = torch.device(device).type == 'cuda'
    # on a GPU no settling step before each timed one (compare's default on CPU, where a step after another model's
    # finds malloc's heap shaped by that model): CUDA's caching allocator keeps both models' blocks after the
    # warm-up, and without it the three size groups take half the device time
    defaults = dict(batch_size=256, repeats=20, warmup=5, amp='bf16', settle_steps=0) if on_gpu else \
        dict(batch_size=32, repeats=7, warmup=1, amp=None)
    chosen = dict(batch_size=args.batch_size, repeats=args.repeats, amp=args.amp)
    if args.compile:
        defaults['warmup'] += 1  # the first call compiles
    return SpeedSettings(
        device=device, threads=args.threads or free_cpu_threads(), compile=args.compile,
        channels_last=args.channels_last, malloc=args.malloc,
        **{**defaults, **{k: v for k, v in chosen.items() if v is not None}})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('--sizes', nargs='+', choices=list(SIZE_GROUPS), default=list(SIZE_GROUPS))
    parser.add_argument('--models', nargs='+', help='time these instead of the size groups (with --reference)')
    parser.add_argument('--reference', default='deit_small_patch16_224', help='the reference of --models')
    parser.add_argument('--device', default=None, help='default: cuda if torch sees one, else cpu')
    parser.add_argument('--batch-size', type=int, default=None, help='default: 256 on a GPU, 32 on a CPU')
    parser.add_argument('--repeats', type=int, default=None, help='default: 20 on a GPU, 7 on a CPU')
    parser.add_argument('--threads', type=int, default=None, help='default: free_cpu_threads()')
    parser.add_argument('--amp', choices=['bf16', 'fp16'], default=None, help='default: bf16 on a GPU, off on a CPU')
    parser.add_argument('--compile', action='store_true', help='time torch.compile(model)')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--malloc', choices=MALLOC_SETTINGS, default='default',
                        help="CPU: 'keep' times the models' own compute without page faults (as timm-hybrid compare)")
    parser.add_argument('--no-memory', action='store_true',
                        help='skip the training peak memory (one spawned process a model: half of a GPU run\'s time)')
    parser.add_argument('--output', type=Path, default=None, help='default: benchmarks/results/<device>')
    parser.add_argument('--profile', nargs='*', default=None, metavar='MODEL',
                        help='after the timings, profile one training step of each into <output>/profile (none '
                             f'named: {", ".join(PROFILE_TARGETS)})')
    args = parser.parse_args()

    settings = device_settings(args)
    out = args.output or RESULTS / device_folder_name(settings)
    groups = {'models': (args.models, args.reference)} if args.models else size_groups(args.sizes, settings.on_gpu)
    progress = Progress()
    meta = dict(settings=settings.describe(), processor=processor_name(settings),
                ratios='x DeiT of the same size, timed in the same interleaved rounds')
    rows = []
    for stem, (names, reference) in groups.items():
        short = reference_short_name(reference)
        for row in compare_models(names, output_dir=out, settings=settings, references=[reference],
                                  progress=progress, stem=stem, memory=not args.no_memory):
            # one column for every size: x the DeiT of the model's size
            rows.append({re.sub(rf'_x_{short}$', '_x_deit', k): v for k, v in row.items()} | dict(reference=reference))
        # after each group: a run cut by a lease's time limit keeps the combined table of the groups it finished
        write_results(rows, out, 'benchmark', meta, title=f'Speed on {device_folder_name(settings)}')
        plot_speed_vs_gmacs(rows, out / 'speed_vs_gmacs.png', settings)
    failed = [f'{r["model"]} ({r["error"]})' for r in rows if 'error' in r]
    for spec in PROFILE_TARGETS if args.profile == [] else args.profile or ():
        try:
            table, profile_meta = profile_step(spec, settings, train=True, rows=30, warmup=3)
            print(f'profiled {spec}: {write_profile(spec, True, table, profile_meta, out / "profile")}')
        except Exception as e:  # the next profile and the timings written above are worth more than this one
            failed.append(f'profile of {spec} ({error_line(e)})')
            print(f'failed: {failed[-1]}', file=sys.stderr)
    print(f'written to {out.resolve()}')
    if failed:
        print('failed: ' + '; '.join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
