""" Params and fvcore GMACs (attention matmuls counted) of every model timm_hybrid registers, at its own input size.

    python benchmarks/zoo_table.py        # -> benchmarks/results/zoo.{csv,md,json}
"""
from pathlib import Path

import timm

import timm_hybrid  # noqa: F401
from timm_hybrid import count_flops
from timm_hybrid.compare import write_results

OUT = Path(__file__).resolve().parent / 'results'


def main() -> None:
    names = sorted(n for n in timm.list_models()
                   if timm.models.model_entrypoint(n).__module__.startswith('timm_hybrid.'))
    rows = []
    for name in names:
        model = timm.create_model(name)
        size = tuple(model.pretrained_cfg['input_size'])
        f = count_flops(model, input_size=size)
        rows.append(dict(model=name, family=timm.models.model_entrypoint(name).__module__.rsplit('.', 1)[-1],
                         input=f'{size[0]}x{size[1]}x{size[2]}', param_count=round(f.mparams, 3),
                         infer_gmacs=round(f.gmacs, 4)))
        print(rows[-1], flush=True)
    write_results(rows, OUT, 'zoo', title='Params and fvcore GMACs (attention matmuls counted, '
                  "`timm_hybrid.count_flops`) at each model's default input size")


if __name__ == '__main__':
    main()
