"""Peak memory of one call, two ways.

torch_peak_allocated(fn): the highest number of bytes torch's CPU allocator held during fn() (the profiler's
running total): exact for torch tensors, blind to what C++ code allocates outside torch.

measure(fn): peak resident memory, from the kernel's own counters: what the C++ kernels allocate outside torch
(per-thread scratch, thread stacks) counts as well as torch's tensors.

measure(fn) resets the process's peak (VmHWM, by writing 5 to /proc/self/clear_refs, Linux 4.0+), runs fn and
returns its result and VmHWM − VmRSS before the call: the growth of resident memory at the call's highest point,
in 4 KiB pages (2 MiB where transparent huge pages back a buffer). Run it in a child started by run_child: that
child's glibc returns every freed block of 64 KiB and more to the kernel at once (MALLOC_MMAP_THRESHOLD_=65536;
by default the threshold moves up to 32 MiB and freed blocks below it stay resident in the heap, so the growth
would depend on what ran before), and its heap holds nothing from other tests.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGE_SLACK = 2 * 2**20   # a buffer's last partly used page: 2 MiB when it is backed by a transparent huge page


def status_bytes(key: str) -> int:
    """A VmXXX line of /proc/self/status in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"/proc/self/status has no {key} line")


def _trim() -> None:
    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def measure(fn):
    """(fn(), bytes): the result and the growth of resident memory at the call's peak."""
    _trim()
    before = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = fn()
    return out, status_bytes("VmHWM") - before


def torch_peak_allocated(fn, trace: Path) -> int:
    """The highest number of bytes torch's CPU allocator held during fn(), counted from the start of the
    measurement. torch.profiler with profile_memory records every allocation and free with the allocator's running
    total ("Total Allocated"), which is the CPU counterpart of torch.cuda.max_memory_allocated. `trace`: where the
    profiler's trace is written to be read back."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(trace))
    events = [e["args"] for e in json.loads(Path(trace).read_text())["traceEvents"] if e.get("name") == "[memory]"]
    assert events, "the profiler recorded no allocations"
    # the running total also holds what earlier profiled code allocated and freed unobserved: start from the
    # total just before the first event
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


def run_child(code: str, timeout: float = 600, threads: int = 0, folders: tuple = ("tests",)) -> dict:
    """Runs `code` in a fresh Python (this one) with the repository and its `folders` on sys.path and the malloc
    settings above; the code prints one JSON object as its last line, which is returned. threads > 0 sets torch's
    threads."""
    path = [str(REPO)] + [str(REPO / f) for f in folders]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=os.pathsep.join(path))
    prelude = f"import torch\nif {threads}: torch.set_num_threads({threads})\n"
    r = subprocess.run([sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=str(REPO))
    if r.returncode != 0:
        raise RuntimeError(f"child failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
