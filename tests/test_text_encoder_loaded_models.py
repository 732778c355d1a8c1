"""ComfyUI's list of loaded models after 'SVDQuant Text Encoder Loader' (ComfyUI in-process, tiny random files).

comfy.sd.CLIP loads the stock ModelPatcher it builds (on the CPU the load and initial devices agree); the loader
then swaps in its own patcher (nodes/text_encoder.py). Without unloading the stock one first, its entry in
comfy.model_management.current_loaded_models outlived it: ComfyUI then logged "WARNING, memory leak with model
FluxClipModel_" at its next cleanup and kept a dead entry.
"""
from __future__ import annotations

import logging

from test_save_nodes import files, nodes  # noqa: F401  (fixtures: the tiny FLUX / CLIP-L / T5 files)


def test_no_dead_entry_and_no_leak_warning_after_loading(nodes, files, caplog):
    import comfy.model_management as mm
    mm.unload_all_models()
    with caplog.at_level(logging.INFO):
        clip = nodes["te"].load_text_encoder(files["t5_int4"], files["clip_l"])
        mm.cleanup_models_gc()
    assert not [r.message for r in caplog.records if "memory leak" in r.message.lower()]
    assert not [m for m in mm.current_loaded_models if m.is_dead()]
    # the swapped-in patcher still loads and encodes
    tokens = clip.tokenize("a photo of a cat")
    cond = clip.encode_from_tokens(tokens, return_pooled=True)
    assert cond[0].shape[0] == 1
    assert any(m.model is clip.patcher for m in mm.current_loaded_models)
