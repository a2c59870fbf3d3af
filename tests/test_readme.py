""" README.md runs as written: every shell command (at a quick size where the real one takes long) and every Python
snippet, offline.

A block that needs what a test machine may lack is marked in the README with `<!-- readme-test: needs REASON, ... -->`
right above it. Only the commands of that kind in it are skipped (a marked snippet as a whole), only while the machine
lacks it, and a marker must name something its block really needs.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_hybrid  # noqa: F401
from timm_hybrid.cli import COMMANDS, build_parser
from timm_hybrid.data import DEBIAN_FASHION_MNIST_DIR

REPO = Path(__file__).resolve().parents[1]
README = REPO / 'README.md'

# reason: (what a command or snippet that needs it looks like, whether this machine has it)
REASONS = {
    # (a tag's weights ship in the package: `create_model('<arch>.<tag>', pretrained=True)` needs no network)
    'network': (r'\bpip install\b|\bgit clone\b|\bhf (download|auth)\b|\bHF_TOKEN\b|timm-hybrid push|hf-hub:|'
                r'timm-hybrid publish(?!.*--dry-run)',  # a dry run needs no network
                lambda: False),
    'timm-scripts': (r'timm-scripts/', lambda: bool(os.environ.get('TIMM_SCRIPTS'))),  # a folder with timm's scripts
    'fashion-mnist': (r'timm-hybrid data fashion-mnist|--data-dir data/fm', DEBIAN_FASHION_MNIST_DIR.is_dir),
    'cuda': (r'--device cuda', torch.cuda.is_available),
    'refiner-checkpoint': (r'refiner-l-448\.pth', lambda: False),  # an official file, not redistributable here
}
# what runs instead of a long command: arguments appended (argparse keeps the last value of an option)
QUICK_ARGS = {
    'timm-hybrid compare': '--models cnt_nano_patch7_28 deit_nano_patch7_28 --references deit_nano_patch7_28 '
                           '--batch-size 2 --repeats 1',
    'python benchmarks/device_benchmark.py': '--models cnt_nano_patch7_28 --reference cnt_nano_patch7_28 '
                                             '--batch-size 2 --repeats 1 --output device-benchmark',
    'python -m pytest': '--help',  # the suite runs this test
    'python timm-scripts/': '--help',  # training runs take hours
    'torchrun ': '--help',
    'timm-hybrid run timm-scripts/': '--help',
}


def readme_blocks():
    """ (language, code, reasons) of every fenced bash / python block, in order. """
    pattern = re.compile(
        r'(?:<!-- readme-test: needs (?P<needs>[^>]*?) -->\n)?```(?P<lang>bash|python)\n(?P<code>.*?)```', re.S)
    return [(m['lang'], m['code'], [r.strip() for r in m['needs'].split(',')] if m['needs'] else [])
            for m in pattern.finditer(README.read_text())]


def strip_comment(line: str) -> str:
    """ The line up to a shell comment: a '#' that starts a word outside quotes. """
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in '"\'':
            quote = ch
        elif ch == '#' and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def shell_commands(code: str):
    """ The block's commands: continuation lines joined, comments dropped, `a && b` split. """
    commands = []
    for line in code.replace('\\\n', ' ').splitlines():
        commands += [c.strip() for c in strip_comment(line).split(' && ') if c.strip()]
    return commands


def needs(text: str, reasons):
    return [r for r in reasons if re.search(REASONS[r][0], text)]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """ A fresh folder holding what the README's own skipped steps would have left: exported folders in weights/ (a
    copy of the package's: the export command writes there), benchmarks/, the checkpoint timm's train.py writes, DeiT-S
    weights as `hf download` fetches them (random values, the same keys). """
    shutil.copytree(REPO / 'timm_hybrid' / 'weights', tmp_path / 'weights')
    (tmp_path / 'benchmarks').symlink_to(REPO / 'benchmarks')
    if os.environ.get('TIMM_SCRIPTS'):
        (tmp_path / 'timm-scripts').symlink_to(Path(os.environ['TIMM_SCRIPTS']).resolve())
    (tmp_path / 'output' / 'cnt_nano').mkdir(parents=True)
    torch.save({'epoch': 1, 'state_dict': timm.create_model('cnt_nano_patch7_28').state_dict()},
               tmp_path / 'output' / 'cnt_nano' / 'model_best.pth.tar')
    from safetensors.torch import save_file
    (tmp_path / 'deit_small_patch16_224.fb_in1k').mkdir()
    save_file(timm.create_model('deit_small_patch16_224').state_dict(),
              tmp_path / 'deit_small_patch16_224.fb_in1k' / 'model.safetensors')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_markers_name_what_their_block_needs():
    blocks = readme_blocks()
    assert sum(lang == 'bash' for lang, _, _ in blocks) >= 8 and sum(lang == 'python' for lang, _, _ in blocks) >= 5
    for lang, code, reasons in blocks:
        assert set(reasons) <= set(REASONS), reasons
        assert needs(code, reasons) == reasons, f'a marker names what its block does not need:\n{code}'
        if 'network' not in reasons:  # never run something that would download or upload
            assert not re.search(REASONS['network'][0], code), f'unmarked block needs the network:\n{code}'


def test_shell_commands_run_as_written(workdir):
    """ All bash blocks in one shell session (their variables carry over), quick sizes where the command is long. """
    script = ['set -euxo pipefail']
    for lang, code, reasons in readme_blocks():
        if lang != 'bash':
            continue
        for command in shell_commands(code):
            missing = [r for r in needs(command, reasons) if not REASONS[r][1]()]
            if missing:
                script.append(f': skipped, needs {", ".join(missing)}')
                continue
            quick = next((args for prefix, args in QUICK_ARGS.items() if command.startswith(prefix)), None)
            script.append(f'{command} {quick}' if quick else command)
    env = dict(os.environ, HF_HUB_OFFLINE='1', PATH=f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}')
    proc = subprocess.run(['bash', '-c', '\n'.join(script)], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f'{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}'
    # what the README says the main command leaves behind, where it says
    assert {p.suffix for p in (workdir / 'timm-hybrid-results' / 'compare').iterdir()} == {'.csv', '.md', '.json',
                                                                                           '.png'}
    assert (workdir / 'device-benchmark' / 'speed_vs_gmacs.png').is_file()
    assert (workdir / 'weights' / 'cnt_nano_patch7_28.fmnist' / 'model.safetensors').is_file()  # the export ran


def test_python_snippets_run(workdir):
    ran = 0
    for lang, code, reasons in readme_blocks():
        if lang != 'python' or any(not REASONS[r][1]() for r in reasons):
            continue
        exec(compile(code, f'README.md snippet {ran}', 'exec'), {'__name__': '__readme__'})
        ran += 1
    assert ran >= 5


def test_inline_commands_are_accepted():
    """ `timm-hybrid ...` commands quoted in the text parse with the CLI's own parser; named scripts exist. """
    text = README.read_text()
    checked = 0
    for span in re.findall(r'`(timm-hybrid [^`]+)`', text):
        args = span.split()[1:]
        if len(args) < 2 or args[0] not in COMMANDS or '|' in span:  # a sub-command named in prose, --help, ...
            continue
        build_parser([args[0]]).parse_args(args)
        checked += 1
    assert checked >= 3
    for script in re.findall(r'`python (benchmarks/\S+\.py)', text):
        assert (REPO / script).is_file(), script
