""" Params and fvcore GMACs (attention matmuls counted) of every model timm_hybrid registers, at its own input size.

    python benchmarks/zoo_table.py        # -> benchmarks/results/zoo.{csv,md}
"""
from pathlib import Path

import timm

import timm_hybrid  # noqa: F401
from timm_hybrid import count_flops
from timm_hybrid.compare import _markdown

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
                         input=f'{size[0]}x{size[1]}x{size[2]}', params_m=round(f.mparams, 3),
                         gmacs=round(f.gmacs, 4), train_gmacs_3x=round(f.train_gmacs, 3)))
        print(rows[-1], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / 'zoo.md').write_text(
        'Params and fvcore GMACs (attention matmuls counted, `timm_hybrid.count_flops`) at each model\'s default '
        'input size. Command: `python benchmarks/zoo_table.py`.\n\n' + _markdown(rows) + '\n')
    with open(OUT / 'zoo.csv', 'w') as f:
        f.write(','.join(rows[0]) + '\n' + '\n'.join(','.join(str(v) for v in r.values()) for r in rows) + '\n')


if __name__ == '__main__':
    main()
