import os

import pytest
import timm
import torch

import timm_hybrid  # noqa: F401  registers the models

# The suite runs on 2 shared CPU cores; small thread pools keep it predictable.
torch.set_num_threads(int(os.environ.get('TIMM_HYBRID_TEST_THREADS', '2')))


def hybrid_model_names(pattern: str = '*') -> list:
    """ Every model that timm_hybrid registers (timm's own models excluded). """
    return sorted(
        name for name in timm.list_models(pattern)
        if timm.models.model_entrypoint(name).__module__.startswith('timm_hybrid.'))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
