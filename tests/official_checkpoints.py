""" Synthetic official checkpoints: a model's own state dict under the official release's key names, the inverse of
the families' `checkpoint_filter_fn`s (tests/test_weights.py holds these layouts to the key names of the official
code's state dicts in tests/fixtures/). Tests feed them to timm's pretrained loading and to `timm-hybrid publish` as
if downloaded, without the real (large, not redistributable) files. """
import re
from typing import Dict

import torch

# ours -> official, in the order applied (see the renames in timm_hybrid/models/transcnn.py and refiner.py)
_TRANSCNN_FFN = {'conv_pw': 'conv1.0', 'bn1': 'conv1.1', 'conv_dw': 'conv2.0', 'bn2': 'conv2.1',
                 'conv_pwl': 'conv3.0', 'bn3': 'conv3.1'}
_HATNET_FFN = {'norm': 'conv1.0', 'conv_pw': 'conv1.1', 'conv_dw': 'conv2.0', 'conv_pwl': 'conv3.0',
               'norm_out': 'conv3.1'}
_REFINER = (
    (r'^patch_embed\.conv(\d)\.conv\.weight$', r'patch_embed.conv\1.weight'),
    (r'^patch_embed\.conv(\d)\.bn\.', r'patch_embed.bn\1.'),
    (r'\.attn\.refine\.expand\.conv\.', '.attn.DLA.conv_exp.'),
    (r'\.attn\.refine\.expand\.bn\.', '.attn.DLA.bn1.'),
    (r'\.attn\.refine\.conv_dw\.conv\.', '.attn.DLA.depth_sep_conv.'),
    (r'\.attn\.refine\.conv_dw\.bn\.', '.attn.DLA.bn2.'),
    (r'\.attn\.refine\.reduce\.conv\.', '.attn.DLA.conv_pro.'),
    (r'\.attn\.refine\.reduce\.bn\.', '.attn.DLA.bn3.'),
    (r'\.attn\.norm\.', '.attn.adapt_bn.'),
    (r'\.ls2\.gamma$', '.mlp.scale_channel'),
    (r'\.attn\.v\.', '.attn.qkv.'),  # a refiner block's value projection is the released `qkv`
)


def _transcnn_key(key: str, hatnet: bool) -> str:
    m = re.match(r'stages\.(\d+)\.blocks\.(\d+)\.(.*)', key)
    if m:
        stage, block, rest = m.groups()
        rest = rest.replace('attn.local_norm.', 'attn.grid_norm.').replace('attn.pool_norm.', 'attn.ds_norm.')
        ffn = re.match(r'mlp\.(\w+)\.(.*)', rest)
        if ffn:
            rest = f'conv.{(_HATNET_FFN if hatnet else _TRANSCNN_FFN)[ffn.group(1)]}.{ffn.group(2)}'
        return f'blocks.{stage}.{block}.{rest}'
    m = re.match(r'stages\.(\d+)\.downsample\.(conv\.conv|conv\.bn|shortcut\.conv|shortcut\.bn)\.(.*)', key)
    if m:
        stage, layer, rest = m.groups()
        layer = {'conv.conv': 'conv', 'conv.bn': 'norm' if hatnet else 'norm1', 'shortcut.conv': 'residual',
                 'shortcut.bn': 'norm2'}[layer]
        return f'ds{int(stage) + 1}.{layer}.{rest}'
    for ours, official in (('stem.0.conv.', 'patch_embed.0.'), ('stem.0.bn.', 'patch_embed.1.'),
                           ('stem.1.', 'patch_embed.3.'), ('head.fc.', 'classifier.1.')):
        if key.startswith(ours):
            return official + key[len(ours):]
    return key


def official_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """ `model`'s weights as the official TransCNN / HAT-Net / Refiner-ViT code names them. """
    family = type(model).__module__.rsplit('.', 1)[-1]
    state_dict = model.state_dict()
    if family == 'transcnn':
        hatnet = not any('.shortcut.' in k for k in state_dict)
        out = {_transcnn_key(k, hatnet): v for k, v in state_dict.items()}
        if hatnet:  # the official HAT-Net holds an unused projection norm per attention (the filter drops it)
            for k in [k for k in out if k.endswith('.attn.proj.weight')]:
                dim = out[k].shape[0]
                out[k.replace('.proj.weight', '.proj_norm.weight')] = torch.ones(dim)
                out[k.replace('.proj.weight', '.proj_norm.bias')] = torch.zeros(dim)
        return out
    if family == 'refiner':
        refiner_blocks = {k.split('.')[1] for k in state_dict if '.attn.refine.' in k}
        out = {}
        for k, v in state_dict.items():
            for pattern, repl in _REFINER:
                if pattern == r'\.attn\.v\.' and k.split('.')[:2] not in [['blocks', b] for b in refiner_blocks]:
                    continue
                k = re.sub(pattern, repl, k)
            out[k] = v
        return out
    raise ValueError(f'no official layout for {type(model).__name__}')


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
