"""The ComfyUI adapter: nodes, custom_operations and the ModelPatcher subclass. Imports comfy; the
repository's top-level __init__.py imports these modules only inside ComfyUI. No math here (nunchaku_core)."""
