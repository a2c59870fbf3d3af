""" Run by tests/test_hub.py: `timm-hybrid export` that stalls at a stage, after writing half the weight file
(`weights`) or while the card is rendered (`card`), and then writes READY_FILE so that the test can SIGKILL it there.

    python tests/killed_export.py weights|card READY_FILE EXPORT_ARGV...
"""
import sys
import time
from pathlib import Path

import safetensors.torch

from timm_hybrid import hub
from timm_hybrid.cli import main


def stall_after(fn, ready: Path, truncate: bool = False):
    """ `fn`, then (the written file cut to half its bytes where `truncate`) READY_FILE and a sleep until killed. """
    def stalled(*args, **kwargs):
        fn(*args, **kwargs)
        if truncate:
            written = Path(args[1] if len(args) > 1 else kwargs['filename'])
            data = written.read_bytes()
            written.write_bytes(data[:len(data) // 2])
        ready.write_text('killing time')
        time.sleep(600)
    return stalled


if __name__ == '__main__':
    stage, ready = sys.argv[1], Path(sys.argv[2])
    if stage == 'weights':  # half the weight file on disk, then the kill
        safetensors.torch.save_file = stall_after(safetensors.torch.save_file, ready, truncate=True)
    else:  # weights and config written, the card being rendered
        hub.render_model_card = stall_after(hub.render_model_card, ready)
    sys.exit(main(sys.argv[3:]))
