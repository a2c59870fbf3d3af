""" Where one step's time goes: `torch.profiler` over one inference or training step (compare's own step: forward +
cross-entropy + backward + AdamW), ops grouped by input shape, largest self time first. One step of a shared machine:
read the shares, not the milliseconds.

    python benchmarks/profile_step.py refiner_vit_small_patch16_224:depth=4 --train --threads 2 --batch-size 32
    # -> benchmarks/results/profile/<model spec>-<train|infer>.{csv,md,json}
"""
import argparse
import re
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from timm_hybrid.compare import SpeedSettings, create_model_spec, make_step, write_results

OUT = Path(__file__).resolve().parent / 'results' / 'profile'


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('model', help='timm name or compare model spec, e.g. cnt_ti_patch16_224:inner_impl=conv')
    p.add_argument('--train', action='store_true', help='a training step (default: inference)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--rows', type=int, default=20, help='ops to keep (default: %(default)s)')
    p.add_argument('--warmup', type=int, default=6,
                   help='steps before the profiled one (default: %(default)s; on CPU the first 3-4 training steps run '
                        'up to 1.3x slower while malloc\'s heap settles)')
    args = p.parse_args()

    settings = SpeedSettings(threads=args.threads, batch_size=args.batch_size)
    torch.set_num_threads(settings.threads)
    model = create_model_spec(args.model)
    step = make_step(model, tuple(model.pretrained_cfg['input_size']), settings, train=args.train)
    for _ in range(args.warmup):  # the first steps allocate the optimizer state and grow malloc's heap
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    events = prof.key_averages(group_by_input_shape=True)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1000
    rows = [
        dict(op=e.key, input_shapes=str(e.input_shapes), calls=e.count,
             self_ms=round(e.self_cpu_time_total / 1000, 1),
             self_share=round(e.self_cpu_time_total / 1000 / total_ms, 3))
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.rows]]
    stem = re.sub(r'[^0-9A-Za-z_.=-]+', '_', args.model) + ('-train' if args.train else '-infer')
    meta = dict(settings=f'threads {settings.threads}, batch {settings.batch_size}, one step after {args.warmup} '
                         'warm-up',
                self_ms_all_ops=round(total_ms, 1))
    write_results(rows, OUT, stem, meta, title=f'{args.model}: {"training step" if args.train else "inference"}')
    print((OUT / f'{stem}.md').read_text())


if __name__ == '__main__':
    main()
