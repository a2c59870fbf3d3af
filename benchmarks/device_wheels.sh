#!/usr/bin/env bash
# Run here, before a call of the device tool (it needs the package registry, which the GPU machine cannot reach):
# builds .whl/, the pure-Python wheels that benchmarks/device_run.sh installs there. The machine's image has torch,
# but not fvcore (nor its iopath, yacs and termcolor) and not necessarily this timm. Pinned to the versions installed
# here, the ones the tests ran with. .whl/ is ignored by git; the call names it in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
specs=$(python -c "from importlib.metadata import version
print(' '.join(f'{n}=={version(n)}' for n in ('timm', 'fvcore', 'iopath', 'yacs', 'termcolor')))")
rm -rf .whl
python -m pip wheel -q --no-deps --wheel-dir .whl $specs
ls .whl
