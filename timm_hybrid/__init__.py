"""timm-hybrid: Convolution-iN-Transformer (CNT), TransCNN / HAT-Net and Refiner-ViT for timm.

`import timm_hybrid` registers every architecture with timm's model registry, so
`timm.create_model('cnt_s_patch16_224')` and timm's scripts work unchanged.
"""
import sys
from pathlib import Path

__version__ = '0.1.0'
__all__ = ['count_flops']


def _started_as_console_script() -> bool:
    """ The `timm-hybrid` console script imports this package before its main(); its sub-commands import what they
    use (the models included), so `timm-hybrid --help` does not wait for timm's import (~4 s on a 2-core CPU). """
    argv = getattr(sys, 'argv', None) or ['']
    return Path(argv[0]).name.split('.')[0] in ('timm-hybrid', 'timm-hybrid-script')


if not _started_as_console_script():
    from . import models  # noqa: F401  registers every family with timm


def __getattr__(name: str):
    # fvcore takes ~2 s to import: only when counting is asked for
    if name == 'count_flops':
        from .flops import count_flops
        return count_flops
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
