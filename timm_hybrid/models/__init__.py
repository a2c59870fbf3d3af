"""Architectures of timm-hybrid; importing this package registers each family with timm."""
from .baselines import *
from .cnt import *
from .refiner import *
from .transcnn import *
from ._common import PretrainedWeightsUnavailable  # noqa: F401  raised when a tag's weights cannot be fetched
