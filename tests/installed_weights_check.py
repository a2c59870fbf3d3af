""" Run by tests/test_weights.py with the interpreter of an installed wheel, outside the source tree: every tag with a
folder in the committed weights loads offline from the installed package and gives the logits of those committed
weights. Any network access fails the check. Prints `ok TAG` per tag.

    python tests/installed_weights_check.py COMMITTED_WEIGHTS_DIR SITE_DIR
"""
import socket
import sys
from pathlib import Path


def refuse(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args}')


socket.socket.connect = refuse  # before anything is imported that could open a connection
socket.create_connection = refuse

import safetensors.torch  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import timm_hybrid  # noqa: E402


def main(committed: Path, site: Path) -> None:
    assert Path(timm_hybrid.__file__).is_relative_to(site), timm_hybrid.__file__
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    for tag in sorted(p.name for p in committed.iterdir()):
        model = timm.create_model(tag, pretrained=True).eval()
        assert Path(model.pretrained_cfg['file']).is_relative_to(site), model.pretrained_cfg['file']
        reference = timm.create_model(tag.split('.')[0]).eval()
        reference.load_state_dict(safetensors.torch.load_file(committed / tag / 'model.safetensors'))
        with torch.no_grad():
            assert torch.equal(model(x), reference(x)), tag
        print('ok', tag)


if __name__ == '__main__':
    main(Path(sys.argv[1]), Path(sys.argv[2]))
