""" pyproject.toml's dependencies: everything the package imports is declared, this environment satisfies the
declared floors, and the floors of the small dependencies install and run: import, a packaged tag's forward, export
with its model card, a FLOP count.

What the floor test proves and what it does not: timm, huggingface_hub, safetensors and Jinja2 are installed at
exactly their floors (pure-Python or small wheels, from PyPI) into a venv over this interpreter's site-packages, so
the package runs against those versions. torch, numpy and fvcore stay this environment's: a torch floor install is
gigabytes (its CUDA libraries) and numpy's binary interface is torch's build's; fvcore's floor 0.1.5 has only dated
post-releases. Without a package index the floor test skips, saying so.
"""
import ast
import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
DEPENDENCIES = [Requirement(r) for r in PYPROJECT['dependencies']]
EXTRAS = [Requirement(r) for reqs in PYPROJECT['optional-dependencies'].values() for r in reqs]
NOT_INSTALLED_AT_FLOOR = {'torch', 'numpy', 'fvcore'}  # see the module docstring
# pip's words for "no index reachable" (as opposed to "this version does not exist / does not install")
NO_NETWORK = ('Failed to establish a new connection', 'Network is unreachable', 'Temporary failure in name resolution',
              'No address associated', 'Could not fetch URL', 'connection error', 'ProxyError')

CHECK_FLOORS = Path(__file__).with_name('declared_floors_check.py')  # run in the floors' venv


def _floor(requirement: Requirement) -> str:
    floors = [s.version for s in requirement.specifier if s.operator == '>=']
    assert len(floors) == 1, f'{requirement}: one >= floor expected'
    return floors[0]


def test_every_imported_distribution_is_declared():
    """ The third-party modules imported anywhere in timm_hybrid/ belong to declared dependencies (an extra for the
    lazily imported ones, e.g. matplotlib in [bench]). """
    declared = {canonicalize_name(r.name) for r in DEPENDENCIES + EXTRAS}
    distributions = importlib.metadata.packages_distributions()
    imported = set()
    for path in (REPO / 'timm_hybrid').rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split('.')[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split('.')[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != 'timm_hybrid'}
    undeclared = {m: distributions.get(m) for m in third_party
                  if not {canonicalize_name(d) for d in distributions.get(m, [m])} & declared}
    assert not undeclared, f'imported but not declared in pyproject.toml: {undeclared}'


@pytest.mark.parametrize('requirement', DEPENDENCIES, ids=[r.name for r in DEPENDENCIES])
def test_this_environment_satisfies_the_declared_floor(requirement):
    installed = importlib.metadata.version(requirement.name)
    assert requirement.specifier.contains(installed, prereleases=True), f'{requirement.name} {installed}'


def test_declared_floors_install_and_import_forward_export(tmp_path):
    pins = [f'{r.name}=={_floor(r)}' for r in DEPENDENCIES if canonicalize_name(r.name) not in NOT_INSTALLED_AT_FLOOR]
    assert len(pins) == 4  # timm, huggingface-hub, jinja2, safetensors
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', str(venv)], check=True, timeout=120)
    python = venv / 'bin' / 'python'
    proc = subprocess.run([str(python), '-m', 'pip', 'install', '-q', '--no-deps', '--disable-pip-version-check',
                           *pins], capture_output=True, text=True, timeout=600)
    if proc.returncode and any(s in proc.stdout + proc.stderr for s in NO_NETWORK):
        pytest.skip(f'no package index reachable to install the floors {pins}')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    proc = subprocess.run([str(python), str(CHECK_FLOORS), str(REPO / 'model_cards' / 'template.md')],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ran = {canonicalize_name(k): Version(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    assert ran == {canonicalize_name(r.name): Version(_floor(r)) for r in DEPENDENCIES
                   if canonicalize_name(r.name) not in NOT_INSTALLED_AT_FLOOR}, ran
