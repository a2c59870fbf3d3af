""" Params and fvcore GMACs of every registered hybrid (timm_hybrid.models.hybrids) next to its host's, at the host's
default input size: what each inserted layer costs.

    python benchmarks/hybrids_table.py        # -> benchmarks/results/hybrids/flops.{csv,md,json}
"""
from pathlib import Path
from typing import Dict

import timm

import timm_hybrid  # noqa: F401
from timm_hybrid import count_flops
from timm_hybrid.compare import write_results
from timm_hybrid.models.hybrids import HOSTS

OUT = Path(__file__).resolve().parent / 'results' / 'hybrids'
LAYERS = {'add_hmhsa': 'H-MHSA', 'refine_attention': 'refiner + hand-on', 'convolve_inner': 'CNT inner conv'}


def hybrid_row(hybrid: str) -> Dict[str, object]:
    """ One hybrid against its host: both counted strictly (every matrix / conv op) at the same input size. """
    host, insert, _, _ = HOSTS[hybrid]
    size = tuple(timm.models.get_pretrained_cfg(host).input_size)
    counts = {name: count_flops(name, input_size=size) for name in (host, hybrid)}
    return {
        'hybrid': hybrid, 'host': host, 'layer': LAYERS[insert.__name__], 'input': 'x'.join(map(str, size)),
        'host_param_count': round(counts[host].mparams, 3), 'param_count': round(counts[hybrid].mparams, 3),
        'host_infer_gmacs': round(counts[host].gmacs, 5), 'infer_gmacs': round(counts[hybrid].gmacs, 5),
        'gmacs_x_host': round(counts[hybrid].gmacs / counts[host].gmacs, 3),
    }


def main() -> None:
    rows = []
    for hybrid in HOSTS:
        rows.append(hybrid_row(hybrid))
        print(rows[-1], flush=True)
    write_results(rows, OUT, 'flops', title='Registered hybrids vs their hosts: params (M) and fvcore GMACs '
                  '(`timm_hybrid.count_flops`, attention matmuls counted) at the host\'s default input size')


if __name__ == '__main__':
    main()
