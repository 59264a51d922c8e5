#!/usr/bin/env bash
# Create .venv, install the engine with a CPU build of torch, then run `demo` (the main job) or `test` (the suite).
# On a GPU machine install the torch build for your CUDA instead (see README, "Install on a GPU machine").
set -euo pipefail
cd "$(dirname "$0")/.."
job=${1:-demo}
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip() { python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip setuptools wheel
# torch first, and pinned on every later call: otherwise pip pulls the CUDA build and several GB with it
pip install -c constraints-cpu.txt torch
# sam2 1.1.0 is a source upload whose build needs torch: build it against the torch just installed
SAM2_BUILD_CUDA=0 pip install -c constraints-cpu.txt --no-build-isolation "sam2==1.1.0"
pip install -c constraints-cpu.txt -e ".[test]"
# sam2 lists torchvision, which has no CPU build for this torch and fails at import; SAM2's video path never uses it
pip uninstall -y torchvision 2>/dev/null || true
case "$job" in
  demo) sslmedsam2 demo -o sslmedsam2-demo ;;
  test) python -m pytest ;;
  *) echo "usage: scripts/setup.sh demo|test" >&2; exit 2 ;;
esac
