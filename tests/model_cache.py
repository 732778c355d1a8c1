"""The cache of test models too slow to make in every run (FLUX-width FLUX.1, the workflows' tiny models, FLUX.2 at
0.3.75's forced width), shared across sessions in $SVDQ_TEST_CACHE (default ~/.cache/svdquant-tests). Each set of
files is named <prefix>-<key>-..., the key a hash of everything that shapes them, so a change to a writer or to the
quantizer makes new files and the old ones of that prefix are deleted."""
from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path
from typing import Callable, Iterable


def source_key(label: str, files: Iterable[Path] = (), functions: Iterable[Callable] = ()) -> str:
    """16 hex digits of sha256 over label, the files' bytes and the functions' source, in that order."""
    h = hashlib.sha256(label.encode())
    for path in files:
        h.update(Path(path).read_bytes())
    for fn in functions:
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()[:16]


def cache_for(prefix: str, key: str) -> Path:
    """The cache folder (created), with every <prefix>-* file of another key deleted."""
    cache = Path(os.environ.get("SVDQ_TEST_CACHE", Path.home() / ".cache" / "svdquant-tests"))
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob(f"{prefix}-*"):
        if key not in stale.name:
            stale.unlink()
    return cache
