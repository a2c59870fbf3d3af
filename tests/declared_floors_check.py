""" Run by tests/test_packaging.py in a venv that holds the declared floor versions of timm, huggingface-hub, jinja2
and safetensors: loads a packaged weight, exports it with a card, loads the export back and counts FLOPs, then prints
the versions it ran with as JSON (the last line).

    python tests/declared_floors_check.py MODEL_CARD_TEMPLATE
"""
import json
import sys
import tempfile
from pathlib import Path

import huggingface_hub
import jinja2
import safetensors
import safetensors.torch
import timm
import torch

from timm_hybrid import count_flops, hub

TAG = 'cnt_nano_patch7_28.fmnist'


def main(card_template: Path) -> None:
    hub.MODEL_CARD_TEMPLATE = card_template
    model = timm.create_model(TAG, pretrained=True).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), tempfile.TemporaryDirectory() as d:
        y = model(x)
        safetensors.torch.save_file(model.state_dict(), Path(d) / 'w.safetensors')
        folder = hub.export(TAG, Path(d) / 'w.safetensors', Path(d) / 'out', card_data=dict(accuracy={'top1': 86.5}))
        assert torch.equal(timm.create_model(f'local-dir:{folder}', pretrained=True).eval()(x), y)
        assert hub.card_accuracy(folder / 'README.md') == {'top1': 86.5}
    assert count_flops(TAG.split('.')[0]).gmacs > 0
    print(json.dumps({m.__name__: m.__version__ for m in (timm, huggingface_hub, safetensors, jinja2)}))


if __name__ == '__main__':
    main(Path(sys.argv[1]))
