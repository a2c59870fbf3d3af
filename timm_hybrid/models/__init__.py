"""Architectures of timm-hybrid; importing this package registers each family with timm."""
from .baselines import *
from .cnt import *
from .refiner import *
from .transcnn import *
