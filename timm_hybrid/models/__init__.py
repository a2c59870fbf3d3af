"""Architectures of timm-hybrid; importing this package registers each family with timm."""
from .baselines import *
from .cnt import *
from .refiner import *
from .transcnn import *
from .hybrids import *  # after the families: hybrids of timm hosts and our baselines
# raised when a tag's weights cannot be fetched; where a tag's official file is cached; per-block key summaries
from ._common import PretrainedWeightsUnavailable, official_weights_cache_file, summarize_keys  # noqa: F401
