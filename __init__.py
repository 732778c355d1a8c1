"""ComfyUI entry point of the SVDQuant node pack.

ComfyUI imports this file as the package `custom_nodes/<this folder>`. Nodes are registered only when
ComfyUI (`folder_paths`, `comfy`) is importable, so the repository also works as a plain Python project
(`python -m nunchaku_core`, pytest). Each node module in NODE_MODULES that exists is imported on its own:
one that fails is logged with its traceback and skipped, and the others still register.
"""
import importlib
import importlib.util
import logging
import os
import sys

log = logging.getLogger("SVDQuant")

NODE_MODULES = ("loader", "quantize", "text_encoder", "lora_stack", "download")

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

_ROOT = os.path.dirname(os.path.abspath(__file__))


def _make_core_importable() -> None:
    """nodes/ imports `nunchaku_core` as a top-level package. Appended, never prepended: our `nodes`
    package must not shadow ComfyUI's own `nodes` module."""
    if _ROOT not in sys.path:
        sys.path.append(_ROOT)
    import nunchaku_core
    where = os.path.dirname(os.path.abspath(nunchaku_core.__file__))
    if where != os.path.join(_ROOT, "nunchaku_core"):
        log.warning("SVDQuant: using nunchaku_core from %s, not the copy in %s (an installed package shadows it)",
                    where, _ROOT)


def _register() -> None:
    _make_core_importable()
    for name in NODE_MODULES:
        if not os.path.isfile(os.path.join(_ROOT, "nodes", f"{name}.py")):
            continue
        try:
            module = importlib.import_module(f".nodes.{name}", __name__)
        except Exception:  # any error in a node module: log it, keep the pack's other nodes
            log.exception("SVDQuant: failed to import nodes.%s; its nodes are not registered", name)
            continue
        NODE_CLASS_MAPPINGS.update(module.NODE_CLASS_MAPPINGS)
        NODE_DISPLAY_NAME_MAPPINGS.update(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}))


def _comfyui_importable() -> bool:
    """ComfyUI's own modules are on the path. Checked by file, without importing anything: under pytest,
    `comfy` also names the namespace package tests/comfy, and importing that would shadow the real one."""
    spec = importlib.util.find_spec("folder_paths")
    return spec is not None and spec.origin is not None and os.path.isfile(
        os.path.join(os.path.dirname(spec.origin), "comfy", "model_management.py"))


if _comfyui_importable():
    _register()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
