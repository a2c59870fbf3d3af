import os
from pathlib import Path

import pytest
import timm
import torch

import timm_hybrid  # noqa: F401  registers the models

# The suite runs on 2 shared CPU cores; small thread pools keep it predictable.
torch.set_num_threads(int(os.environ.get('TIMM_HYBRID_TEST_THREADS', '2')))


def hybrid_model_names(pattern: str = '*') -> list:
    """ Every model that timm_hybrid registers (timm's own models excluded, and the hosts with a layer inserted of
    timm_hybrid.models.hybrids, whose API is their host's: tests/test_hybrids.py). """
    return sorted(
        name for name in timm.list_models(pattern)
        if timm.models.model_entrypoint(name).__module__.startswith('timm_hybrid.')
        and timm.models.model_entrypoint(name).__module__ != 'timm_hybrid.models.hybrids')


def autograd_node_names(out: torch.Tensor) -> list:
    """ The names of the autograd nodes that `out`'s backward would run (e.g. 'CopySlices', 'CloneBackward0'). """
    names, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



@pytest.fixture(scope='session', autouse=True)
def _card_template_under_test():
    """ Cards render from this checkout's template (module fixtures included): an editable install of another
    checkout maps `timm_hybrid.model_cards` (package data) to that checkout's model_cards/. """
    from timm_hybrid import hub
    saved = hub.MODEL_CARD_TEMPLATE
    hub.MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[1] / 'model_cards' / 'template.md'
    yield
    hub.MODEL_CARD_TEMPLATE = saved
