"""3D Slicer ships Python 3.12: the engine's torch-free half runs its tests there, and every module compiles.

torch for 3.12 on PyPI is the multi-GB CUDA build, so the SAM2 half is only compiled here (it runs in the main
suite on 3.11). Skipped where no python3.12 is installed.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TORCH_FREE_TESTS = ["test_volume.py", "test_evaluate.py", "test_download.py", "test_cli_errors.py", "test_interpolation.py",
                    "test_data_safety.py", "test_keyslices.py"]


def _python312() -> str | None:
    found = [p for p in [shutil.which("python3.12"), *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))]
             if p and subprocess.run([p, "--version"], capture_output=True).returncode == 0]
    return found[0] if found else None


@pytest.fixture(scope="module")
def venv312(tmp_path_factory) -> Path:
    python = _python312()
    if python is None:
        pytest.skip("no python3.12 on this machine")
    venv = tmp_path_factory.mktemp("py312") / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run([*pip, "numpy", "scipy", "SimpleITK", "itk-morphologicalcontourinterpolation", "pooch", "tqdm",
                           "filelock", "nibabel", "pydicom", "isal", "pytest"], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"could not install the 3.12 test environment: {done.stderr.strip().splitlines()[-1:]}")
    return venv / "bin" / "python"


def test_every_engine_and_module_file_compiles_on_312(venv312):
    done = subprocess.run([str(venv312), "-m", "compileall", "-q", "-f", str(ROOT / "src" / "sslmedsam2"),
                           str(ROOT / "SSLMedSAM2")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_torch_free_tests_pass_on_312(venv312, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    tests = [str(ROOT / "Testing" / "Python" / name) for name in TORCH_FREE_TESTS]
    # -k: the checkpoint and few-shot tests need torch; everything else in these files must not
    done = subprocess.run([str(venv312), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                           "not checkpoint and not pseudolabel",
                           "--rootdir", str(tmp_path), *tests], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    passed = int(done.stdout.strip().splitlines()[-1].split(" passed")[0].split()[-1])
    assert passed >= 40, done.stdout[-500:]
    version = subprocess.run([str(venv312), "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
    assert version.stdout.strip() == "(3, 12)"
