""" CNT-S vs TNT-S vs DeiT-S CPU inference speed, and where each model's time goes.

    python benchmarks/cnt_speed.py [--batch-size 32 --threads 2 --repeats 7]

1. Speed: the three models timed interleaved in one run (timm_hybrid.compare.time_interleaved), medians with spread,
   as ratios to TNT-S and DeiT-S.
2. Where the time goes: wall time per component (forward hooks; CPU ops are synchronous), same batch and threads:
   embedding, inner block (CNT's ResNet block / TNT's inner transformer), per-block pixel->patch projection, outer
   attention, outer MLP, outer norms, rest (head, concatenations, reshapes).

Writes benchmarks/results/cnt_speed/{speed,components}.{csv,md,json}, README.md and components.png.
"""
import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict

import timm
import torch
import torch.nn as nn

import timm_hybrid  # noqa: F401
from timm_hybrid.compare import SpeedSettings, markdown_table, time_interleaved, write_results

MODELS = ('tnt_s_patch16_224', 'cnt_s_patch16_224', 'deit_small_patch16_224')
OUT = Path(__file__).resolve().parent / 'results' / 'cnt_speed'

# module-name patterns -> component, for timm's TNT, our CNT and timm's ViT/DeiT
COMPONENTS = (
    ('embedding', r'^(pixel_embed|patch_embed|norm1_proj|proj|norm2_proj)$'),
    ('inner block', r'^blocks\.\d+\.(inner|norm_in|attn_in|norm_mlp_in|mlp_in)$'),
    ('pixel->patch proj', r'^blocks\.\d+\.(norm1_proj|proj|norm2_proj)$'),
    ('outer attention', r'^blocks\.\d+\.(outer\.attn|attn_out|attn)$'),
    ('outer MLP', r'^blocks\.\d+\.(outer\.mlp|mlp)$'),
    ('outer norms', r'^blocks\.\d+\.(outer\.norm[12]|norm_out|norm_mlp|norm[12])$'),
)


def component_times(model: nn.Module, x: torch.Tensor, repeats: int) -> Dict[str, float]:
    """ Median seconds per forward spent in each component; 'rest' is the total minus the components. """
    spans = defaultdict(float)
    starts = {}
    handles = []
    for name, module in model.named_modules():
        component = next((c for c, pattern in COMPONENTS if re.match(pattern, name)), None)
        if component is None:
            continue
        handles.append(module.register_forward_pre_hook(
            lambda m, args, key=name: starts.__setitem__(key, time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, args, out, key=name, c=component: spans.__setitem__(
                c, spans[c] + time.perf_counter() - starts[key])))
    runs = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            spans.clear()
            start = time.perf_counter()
            model(x)
            total = time.perf_counter() - start
            runs.append(dict(spans, total=total, rest=total - sum(spans.values())))
    for h in handles:
        h.remove()
    keys = [c for c, _ in COMPONENTS] + ['rest', 'total']
    return {k: sorted(r.get(k, 0.) for r in runs)[len(runs) // 2] for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--output', type=Path, default=OUT, help='folder to write (default: %(default)s)')
    parser.add_argument('--replot', action='store_true', help='re-render components.png from components.json')
    args = parser.parse_args()
    if args.replot:
        _plot(json.loads((args.output / 'components.json').read_text())['rows'], args.output)
        return
    settings = SpeedSettings(batch_size=args.batch_size, repeats=args.repeats, threads=args.threads)
    torch.set_num_threads(args.threads)

    models = {n: timm.create_model(n).eval() for n in MODELS}
    timing = time_interleaved(models, {n: (3, 224, 224) for n in MODELS}, settings)
    tnt_s, deit_s = timing['tnt_s_patch16_224'].median, timing['deit_small_patch16_224'].median
    speed = [dict(model=n, infer_samples_per_sec=round(args.batch_size / t.median, 1), infer_spread=f'±{t.spread:.1%}',
                  infer_x_tnt_s=round(tnt_s / t.median, 3), infer_x_deit_s=round(deit_s / t.median, 3))
             for n, t in timing.items()]

    x = torch.randn(args.batch_size, 3, 224, 224)
    components = []
    for n, model in models.items():
        times = component_times(model, x, max(3, args.repeats // 2))
        components.append(dict(model=n, **{k: round(v * 1000, 1) for k, v in times.items()}))

    meta = dict(settings=settings.describe())
    text = (f'# CNT-S vs TNT-S vs DeiT-S inference on this CPU\n\nCommand: `python benchmarks/cnt_speed.py '
            f'--batch-size {args.batch_size} --threads {args.threads} --repeats {args.repeats}` '
            f'({meta["settings"]})\n\n'
            f'## Speed (interleaved, median, ± half the range over the repeats)\n\n{markdown_table(speed)}\n\n'
            f'## Where the time goes (ms per batch, median of forward-hook spans)\n\n{markdown_table(components)}\n')
    write_results(speed, args.output, 'speed', meta)
    write_results(components, args.output, 'components', meta)
    (args.output / 'README.md').write_text(text)
    print(text)
    _plot(components, args.output)


def _plot(components, out: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    keys = [c for c, _ in COMPONENTS] + ['rest']
    fig, ax = plt.subplots(figsize=(9, 4))
    left = [0.] * len(components)
    for k in keys:
        values = [r[k] for r in components]
        ax.barh([r['model'] for r in components], values, left=left, label=k)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel('ms per batch (inference)')
    ax.invert_yaxis()
    ax.legend(fontsize=8, ncol=7, loc='upper center', bbox_to_anchor=(0.45, -0.18), frameon=False)
    fig.tight_layout()
    fig.savefig(out / 'components.png', dpi=110)
    plt.close(fig)


if __name__ == '__main__':
    main()
