""" Synthetic official checkpoints: a model's own state dict under the official release's key names, for tests that
feed timm's pretrained loading and `timm-hybrid publish` as if the real (large, not redistributable) files had been
downloaded.

The official naming is learned, not written out again: the fixtures in tests/fixtures/ are state dicts of the
official code (reduced widths and depths, official key names); the family's `checkpoint_filter_fn` maps each of
their tensors to one of ours, and the pairs give, per key shape (digits as '#'), the official key shape and how its
numbers follow from ours (the same index, shifted, or a constant: `ds2.` is `stages.1.downsample.`, `conv.conv1.0.`
is `mlp.conv_pw.`). Any size of the family then maps back to the official names.
"""
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Tuple

import safetensors
import safetensors.torch
import timm
import torch

from timm_hybrid.models import refiner, transcnn

FIXTURES = Path(__file__).parent / 'fixtures'
# family: (official state dict fixture, the model it was made for, our filter)
OFFICIAL_FIXTURES = {
    'transcnn': ('transcnn_official_state_dict.safetensors', 'transcnn_tiny', transcnn.checkpoint_filter_fn),
    'hatnet': ('hatnet_official_state_dict.safetensors', 'hatnet_tiny', transcnn.checkpoint_filter_fn),
    'refiner': ('refiner_official_tiny_state_dict.safetensors', 'refiner_vit_small_patch16_224',
                refiner.checkpoint_filter_fn),
}


def _shape(key: str) -> str:
    return re.sub(r'\d+', '#', key)


def _numbers(key: str) -> List[int]:
    return [int(n) for n in re.findall(r'\d+', key)]


def fixture_model(family: str) -> torch.nn.Module:
    """ Our model at the config the official fixture was made with. """
    name, variant, _ = OFFICIAL_FIXTURES[family]
    if family == 'refiner':
        with safetensors.safe_open(str(FIXTURES / 'refiner_official_tiny_io.safetensors'), 'pt') as f:
            return timm.create_model(variant, aux_head=True, **json.loads(f.metadata()['config']))
    with safetensors.safe_open(str(FIXTURES / name), 'pt') as f:
        return timm.create_model(variant, **json.loads(f.metadata()['model_args']))


@lru_cache(maxsize=None)
def official_layout(family: str) -> Tuple[Dict[str, Tuple[str, list]], List[str]]:
    """ {our key shape: (official key shape, one rule per official number: ('index', i, shift) or ('constant', n))},
    and the official key shapes the filter drops (tensors the official model holds but never uses). """
    name, _, filter_fn = OFFICIAL_FIXTURES[family]
    official = safetensors.torch.load_file(FIXTURES / name)
    ours = filter_fn(dict(official), fixture_model(family))
    official_key = {id(v): k for k, v in official.items()}
    # tensors the filter makes itself (the stored token grid) have no official key
    ours = {k: v for k, v in ours.items() if id(v) in official_key}
    pairs: Dict[str, List[Tuple[List[int], str]]] = {}
    for key, tensor in ours.items():
        pairs.setdefault(_shape(key), []).append((_numbers(key), official_key[id(tensor)]))
    layout = {}
    for shape, examples in pairs.items():
        official_shape, = {_shape(o) for _, o in examples}
        rules = []
        for j in range(official_shape.count('#')):
            wanted = [_numbers(o)[j] for _, o in examples]
            shifts = [(i, {w - n[i] for (n, _), w in zip(examples, wanted)}) for i in range(len(examples[0][0]))]
            varying = [(i, s.pop()) for i, s in shifts if len(s) == 1 and len({n[i] for n, _ in examples}) > 1]
            rules.append(('index', *varying[0]) if varying else ('constant', wanted[0]))
            assert varying or len(set(wanted)) == 1, f'{family}: no rule for number {j} of {official_shape}'
        layout[shape] = (official_shape, rules)
    used = {official_key[id(v)] for v in ours.values()}
    return layout, sorted({_shape(k) for k in official if k not in used})


def official_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """ `model`'s weights under the official TransCNN / HAT-Net / Refiner-ViT key names (the unused official
    tensors added, as the released files hold them). """
    family = type(model).__module__.rsplit('.', 1)[-1]
    if family == 'transcnn' and not any('.shortcut.' in k for k in model.state_dict()):
        family = 'hatnet'  # HAT-Net's downsampling has no shortcut branch
    layout, unused = official_layout(family)
    out = {}
    for key, tensor in model.state_dict().items():
        if key == 'token_grid':  # ours (the patch grid the position embedding was made on); official files lack it
            continue
        official_shape, rules = layout[_shape(key)]
        numbers = _numbers(key)
        values = iter(numbers[r[1]] + r[2] if r[0] == 'index' else r[1] for r in rules)
        out[re.sub('#', lambda _: str(next(values)), official_shape)] = tensor
    for shape in unused:  # HAT-Net's attn.proj_norm (weight, bias): one per attention, as wide as its projection
        assert '.attn.proj_norm.' in shape, shape
        for key in [k for k in out if _shape(k) == shape.rsplit('.attn.', 1)[0] + '.attn.proj.bias']:
            out[key.replace('.proj.bias', '.proj_norm.' + shape.rsplit('.', 1)[1])] = torch.ones_like(out[key])
    return out


def save_official_checkpoint(model: torch.nn.Module, path) -> Dict[str, torch.Tensor]:
    """ Writes `model`'s weights in the official training checkpoint layout ({'model': state_dict}, as the released
    .pth files). First moves every tensor of `model` off its init (in place: zero biases, unit norms and fresh
    running stats would hide a conversion that drops or swaps them). """
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.add_(torch.randn_like(v) * 0.02)
            if k.endswith('running_var'):
                v.abs_().add_(0.5)
    state_dict = official_state_dict(model)
    torch.save({'model': state_dict}, path)
    return state_dict
