"""Architectures of timm-hybrid; importing this package registers each family with timm."""
from .baselines import *
from .cnt import *
from .refiner import *
from .transcnn import *
from .hybrids import *  # after the families: hybrids of timm hosts and our baselines
from ._common import PretrainedWeightsUnavailable  # noqa: F401  raised when a tag's weights cannot be fetched
