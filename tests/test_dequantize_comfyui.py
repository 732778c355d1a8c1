"""`python -m nunchaku_core dequantize` output loads in the real ComfyUI's stock diffusion-model loader
(comfy.sd.load_diffusion_model, what "Load Diffusion Model" calls), is detected as the right Flux variant,
and holds exactly the tensors we wrote. ComfyUI's detection forces hidden 3072, so the model is FLUX width.
"""
import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

from random_checkpoint import write_random_flux

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI = os.environ.get("SVDQ_COMFYUI", os.path.join(REPO, ".comfyui", "ComfyUI"))

PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
path = sys.argv[2]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.sd, comfy.utils
patcher = comfy.sd.load_diffusion_model(path)
model = patcher.model
# the file's keys as this ComfyUI renames them at load (0.33: q/k norms `.scale` -> `.weight`)
sd = model.model_config.process_unet_state_dict(comfy.utils.load_torch_file(path))
mine = model.diffusion_model.state_dict()
diff = [k for k in sd if not (mine[k].float() == sd[k].float()).all()]
missing = [k for k in mine if k not in sd]
print(json.dumps({"class": type(model.model_config).__name__, "depth": model.diffusion_model.params.depth,
                  "single": model.diffusion_model.params.depth_single_blocks,
                  "guidance": model.diffusion_model.params.guidance_embed, "differs": diff, "missing": missing}))
"""


@pytest.mark.parametrize("precision,guidance", [("int4", True), ("nvfp4", False)])
def test_dequantized_file_loads_with_comfyui_stock_loader(tmp_path, precision, guidance):
    assert os.path.isdir(os.path.join(COMFYUI, "comfy")), \
        f"no ComfyUI at {COMFYUI}: run scripts/setup_env.sh or set SVDQ_COMFYUI"
    src, dst = str(tmp_path / "q.safetensors"), str(tmp_path / "flux.safetensors")
    write_random_flux(src, hidden=3072, precision=precision, guidance=guidance, rank=32)
    r = subprocess.run([sys.executable, "-m", "nunchaku_core", "dequantize", src, dst, "--dtype", "bfloat16", "--quiet"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    os.remove(src)      # 369 MB; the 1.06 GB bf16 file is all the probe needs (tmp_path goes when the test passes)
    r = subprocess.run([sys.executable, "-c", PROBE, COMFYUI, dst], capture_output=True, text=True, cwd=COMFYUI)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["class"] == ("Flux" if guidance else "FluxSchnell")
    assert (info["depth"], info["single"], info["guidance"]) == (1, 1, guidance)
    assert info["missing"] == [] and info["differs"] == []
    with safe_open(dst, "pt") as f:
        assert json.loads(f.metadata()["comfy_config"])["model_config"]["hidden_size"] == 3072
