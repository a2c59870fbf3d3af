"""timm-hybrid: Convolution-iN-Transformer (CNT), TransCNN / HAT-Net and Refiner-ViT for timm.

`import timm_hybrid` registers every architecture with timm's model registry, so
`timm.create_model('cnt_s_patch16_224')` and timm's scripts work unchanged.
"""
from . import models
from .flops import count_flops

__version__ = '0.1.0'
