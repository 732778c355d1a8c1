"""ComfyUI (CPU) imported in this process, with this repository imported as a custom-node package the way
ComfyUI imports one. For tests that need ComfyUI's Python API rather than a server."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("SVDQ_COMFYUI", REPO / ".comfyui" / "ComfyUI"))
PACK = "svdquant_pack_under_test"


def import_pack():
    """The pack's top-level module (nodes reachable as sys.modules[f'{PACK}.nodes.<name>'])."""
    if not (COMFYUI / "comfy").is_dir():
        pytest.fail(f"no ComfyUI at {COMFYUI}: run scripts/setup_env.sh or set SVDQ_COMFYUI")
    if str(COMFYUI) not in sys.path:
        sys.path.insert(0, str(COMFYUI))   # first: ComfyUI's own `nodes` module must win over our nodes/ package
    import comfy.cli_args
    comfy.cli_args.args.cpu = True       # before comfy.model_management picks a device
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    assert "SVDQuantFluxLoader" in sys.modules[PACK].NODE_CLASS_MAPPINGS
    return sys.modules[PACK]


def pack_module(name: str):
    import_pack()
    return sys.modules[f"{PACK}.nodes.{name}"]


def checkpoint_module():
    """nodes/checkpoint.py (no comfy imports) loaded by path, without ComfyUI: `nodes` may name ComfyUI's
    own module in these processes. One module object per process (dataclasses look their module up by name)."""
    name = "svdq_checkpoint"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "nodes" / "checkpoint.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]
