"""Node inputs keep their order: a saved workflow stores widget values by position (`widgets_values`), so an
input moved or removed silently shifts every value after it in users' files. New inputs may only be appended
(STYLE.md, "Widget order is part of the saved-workflow format").

RELEASED is every node's inputs as shipped; a change that appends inputs passes, one that reorders, renames or
removes one fails naming the node. Extend RELEASED when appending (never edit an existing entry).
"""
from __future__ import annotations

import pytest

from comfy_inprocess import import_pack

RELEASED = {
    "SVDQuantFluxLoader": {"required": ["model_name", "weight_dtype"]},
    "SVDQuantModelLoader": {"required": ["model_name", "weight_dtype"]},
    "SVDQuantQuantizeModel": {"required": ["model_name", "output_name", "precision", "rank", "calibration", "gptq"]},
    "SVDQuantRecordCalibration": {"required": ["model", "file_name", "max_rows"]},
    "SVDQuantTextEncoderLoader": {"required": ["t5_name", "clip_l_name"]},
    "SVDQuantLoRAStack": {"required": ["model", "lora_1", "strength_1", "lora_2", "strength_2", "lora_3", "strength_3",
                                       "lora_4", "strength_4"], "optional": ["clip"]},
    "SVDQuantDownloadModel": {"required": ["repo_id", "filename", "revision", "weight_dtype"]},
}


@pytest.fixture(scope="module")
def nodes() -> dict:
    return import_pack().NODE_CLASS_MAPPINGS


def test_no_released_node_is_gone(nodes):
    gone = sorted(set(RELEASED) - set(nodes))
    assert not gone, f"nodes removed or renamed: {gone}; saved workflows using them would fail to load"


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_inputs_only_appended(nodes, name):
    current = {section: list(spec) for section, spec in nodes[name].INPUT_TYPES().items()}
    for section, released in RELEASED[name].items():
        now = current.get(section, [])
        assert now[:len(released)] == released, (
            f"{name}: {section} inputs are {now}, released as {released}; append new inputs at the end, never "
            f"reorder, rename or remove (saved workflows store widget values by position)")
