"""Runs tests/triton_interpreter_cases.py (the Triton kernels in Triton's interpreter against nunchaku_core.reference)
in a Python process of its own with TRITON_INTERPRET=1 set before anything imports triton.

Why a process of its own: Triton decides when a module is imported whether its @triton.jit functions, its own
standard library (tl.cdiv, tl.max, ...) included, are interpreted or compiled, and the two kinds cannot call each
other. This test session may already hold the compiled kind (tests/test_triton_compile.py, any module importing
nunchaku_core.kernels), and setting the variable here would reach every later test. The child's full pytest report
is shown when it fails. Cost: ~45 s on the 2-core dev machine under load (interpreter ~25 s CPU + imports).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _child_env(interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.mark.parametrize("family", ["w4a4", "w4a16"])
def test_triton_kernels_in_interpreter(family):
    """Every test of triton_interpreter_cases.py whose name holds the family (w4a16 ones say so; the rest are W4A4
    and the packing/argument checks)."""
    select = "w4a16" if family == "w4a16" else "not w4a16"
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "triton_interpreter_cases.py"), "-q", "-rfE",
           "-p", "no:cacheprovider", "-k", select]
    proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(True), capture_output=True, text=True, timeout=900)
    report = f"{' '.join(cmd)}\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, report


def test_compiled_kind_refuses_cpu_tensors_with_the_fix():
    """Without the interpreter, CPU tensors cannot run: config_for says how to (TRITON_INTERPRET=1) instead of
    Triton failing on a host pointer."""
    code = ("import sys\n"
            "from nunchaku_core.kernels import triton_w4a4, triton_w4a16\n"
            "assert not triton_w4a4.INTERPRETED and not triton_w4a16.INTERPRETED\n"
            "for m in (triton_w4a4, triton_w4a16):\n"
            "    try:\n"
            "        m.config_for('cpu')\n"
            "    except ValueError as e:\n"
            "        assert 'TRITON_INTERPRET=1' in str(e), e\n"
            "    else:\n"
            "        sys.exit(f'{m.__name__}.config_for(cpu) did not raise')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_child_env(False), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
