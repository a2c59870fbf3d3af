""" Run by tests/test_flops.py in a fresh interpreter: prints whether fvcore is imported after loading a model with
its weights, then after counting FLOPs (`False True` expected: fvcore loads only for counting).

    python tests/fvcore_import_check.py
"""
import sys

import timm

import timm_hybrid

if __name__ == '__main__':
    timm.create_model('cnt_nano_patch7_28.fmnist', pretrained=True)
    print('fvcore' in sys.modules, end=' ')
    timm_hybrid.count_flops('cnt_nano_patch7_28')
    print('fvcore' in sys.modules)
