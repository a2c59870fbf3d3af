"""Architectures of timm-hybrid; importing this package registers each family with timm."""
from .cnt import *
