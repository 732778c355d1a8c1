"""bench/gpu_check.py --dry: the GPU check's code paths on the CPU (Triton interpreter, tiny shapes), so that the
command a GPU machine runs is known to work end to end before one runs it. ~30 s."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_runs_and_passes():
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "correctness: all within bounds" in out, out[-4000:]
    assert " FAIL " not in out
    for kernel in ("triton quantize_act codes", "triton W4A4 int4", "triton W4A4 int4 shifted", "triton W4A4 nvfp4",
                   "triton W4A16", "tiled W4A4", "tiled W4A16"):
        assert f"ok   {kernel}" in out, kernel
    assert "ours = the triton backend" in out                      # the table came from the Triton kernels
    assert "skipped: end-to-end step: needs CUDA" in out           # and it says what it did not do
    assert "skipped: comfy-kitchen column: comfy-kitchen's SVDQuant kernel needs CUDA" in out
