"""install.py, the script ComfyUI Manager runs after installing the pack: it builds the compiled kernels in place
with the Python that runs it, and never fails the install (the torch reference runs without them).

The build test copies this checkout's files (tracked and untracked, not ignored: no build/ or .so) into a fresh
folder, as a Manager clone would be, runs `python install.py` there and imports the built extension: about a
minute on 2 cores.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from install import unsupported_reason  # noqa: E402


def checkout_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    return dest


def test_builds_the_kernels_in_a_fresh_checkout(tmp_path):
    pack = checkout_copy(tmp_path / "ComfyUI-SVDQuant")
    assert not list(pack.glob("nunchaku_core/_C*"))
    run = subprocess.run([sys.executable, "install.py"], cwd=pack, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "compiled kernels ready" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    built = list(pack.glob("nunchaku_core/_C*.so"))
    assert len(built) == 1
    probe = subprocess.run([sys.executable, "-c", "import nunchaku_core._C as C, nunchaku_core.backend as b; "
                            "print(C.__file__, b.resolve_backend('cpu'), hasattr(C, 'svdquant_linear_int4'))"],
                           cwd=pack, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    path, backend, has_layer = probe.stdout.split()
    assert Path(path).resolve() == built[0].resolve() and backend == "cpu" and has_layer == "True"


def test_missing_compiler_is_a_message_not_a_failure(tmp_path):
    pack = checkout_copy(tmp_path / "ComfyUI-SVDQuant")
    run = subprocess.run([sys.executable, "install.py"], cwd=pack, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/nonexistent", "CXX": "no-such-c++"})
    assert run.returncode == 0
    assert "no C++ compiler ('no-such-c++' is not on PATH)" in run.stdout
    assert "setup.py build_ext --inplace" in run.stdout   # how to retry
    assert not list(pack.glob("nunchaku_core/_C*"))


@pytest.mark.parametrize("system, machine, words", [
    ("Linux", "aarch64", "x86-64 code"),
    ("Darwin", "arm64", "x86-64 code"),
    ("Windows", "AMD64", "Windows is not supported"),
    ("Darwin", "x86_64", "Darwin is not supported"),
])
def test_unsupported_platforms_are_named(system, machine, words):
    why = unsupported_reason(system, machine)
    assert why is not None and words in why


def test_linux_x86_64_is_supported():
    assert unsupported_reason("Linux", "x86_64") is None
