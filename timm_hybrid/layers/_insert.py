""" What the three insertion functions share: choosing host positions, growing a host module in place, and naming the
state-dict keys an insertion added (so a host checkpoint loads with exactly those missing). """
from typing import List, Optional, Sequence, Type, Union

import torch.nn as nn

__all__ = ['graft', 'inserted_prefixes', 'inserted_state_keys', 'resolve_indices']


def resolve_indices(indices: Optional[Union[int, Sequence[int]]], count: int, what: str) -> List[int]:
    """ Sorted distinct positions among `count` (None: all; negative ones count from the end), or a ValueError. """
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        indices = (indices,)
    resolved = set()
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
            raise ValueError(f'{what} {i!r} out of range: the host has {count} (0..{count - 1}, or negative).')
        resolved.add(i % count)
    if not resolved:
        raise ValueError(f'No {what} given.')
    return sorted(resolved)


def graft(module: nn.Module, cls: Type[nn.Module]) -> nn.Module:
    """ Turns `module` into a `cls` in place, as torch.nn.utils.parametrize does: `cls` subclasses the module's exact
    class and adds only new children, so the host's parameters stay the same objects under the same state-dict keys
    (a host checkpoint, an optimizer built on them, timm's npz loaders all still find them). """
    if cls.__bases__ != (type(module),):
        raise TypeError(f'{cls.__name__} grows a {cls.__bases__[0].__name__}, not a {type(module).__name__}.')
    module.__class__ = cls
    return module


def inserted_prefixes(model: nn.Module) -> List[str]:
    """ The names of what an insertion added to `model` (modules and parameters; each inserted layer lists its own
    new attributes in `inserted_names`, '' for the whole module). """
    prefixes = []
    for name, module in model.named_modules():
        for part in getattr(module, 'inserted_names', ()):
            if part == '' or hasattr(module, part):
                prefixes.append('.'.join(p for p in (name, part) if p))
    return prefixes


def inserted_state_keys(model: nn.Module) -> List[str]:
    """ The keys of `model.state_dict()` that an insertion added; the rest are the host's, unchanged. """
    prefixes = inserted_prefixes(model)
    return [k for k in model.state_dict() if any(k == p or k.startswith(p + '.') for p in prefixes)]
