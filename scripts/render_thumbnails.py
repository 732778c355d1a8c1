"""Render the thumbnails of the workflows beyond FLUX.1 (example_workflows/<name>.jpg) for real:
each workflow's own graph, run through a real ComfyUI with this pack, on its family's tiny random model, exactly
as tests/comfy/test_workflows.py runs it (same model swap: tiny quantized model, random text conditioning, tiny
random decoder), only larger and with more steps. The render fills the 512x512 thumbnail; a caption band says
what it is. The tiny models are random, so the picture shows that the graph runs, not what the family draws.

    SVDQ_COMFYUI=.comfyui/0.33.0/ComfyUI .comfyui/0.33.0/venv/bin/python scripts/render_thumbnails.py [NAME ...]

NAME is a workflow's file stem (default: every workflow of those families). FLUX.2 needs a host whose detection
allows a tiny FLUX.2 (0.33; tests/comfy/test_family_quantized.py). The tiny Qwen-Image and Z-Image are quantized
once and cached like the tests' ($SVDQ_TEST_CACHE).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "comfy"), str(REPO)]

SIZE = 256      # rendered side (the tiny models' cost grows with the token count); shown at 512
STEPS = 4
SEED = 7
THUMB = 512
TITLES = {"qwen_image": "Qwen-Image", "zimage": "Z-Image-Turbo", "flux2": "FLUX.2 [dev]", "sd3": "SD3.5 Large",
          "chroma": "Chroma1-HD", "pixart_sigma": "PixArt-Σ XL 2 1024-MS", "wan21_t2v": "Wan 2.1 T2V 1.3B",
          "sdxl": "SDXL base 1.0"}
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


def _font(bold: bool, size: int):
    from PIL import ImageFont
    path = FONT_DIR / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    return ImageFont.truetype(str(path), size) if path.is_file() else ImageFont.load_default()


def thumbnail(render, family: str):
    """The render scaled to THUMB x THUMB with a caption band at the bottom."""
    from PIL import Image, ImageDraw
    img = Image.fromarray(render).convert("RGB").resize((THUMB, THUMB), Image.Resampling.LANCZOS)
    band = Image.new("RGBA", (THUMB, 92), (16, 18, 28, 215))
    draw = ImageDraw.Draw(band)
    title, size = f"{TITLES[family]} · SVDQuant INT4", 28
    while size > 12 and draw.textlength(title, font=_font(True, size)) > THUMB - 40:
        size -= 1
    draw.text((20, 12), title, font=_font(True, size), fill=(240, 240, 245))
    draw.text((20, 54), "this workflow's output on a tiny random model", font=_font(False, 18), fill=(200, 200, 215))
    img.paste(band, (0, THUMB - band.height), band)
    return img


def main(names: list[str]) -> None:
    import flux_models
    from conftest import MODEL_DIRS, comfy_server
    from test_workflows import WORKFLOW_DIR, WORKFLOWS, family_graph, load, ui_to_api, workflow_family

    with tempfile.TemporaryDirectory(prefix="svdq-thumbnails-") as tmp:
        tmp = Path(tmp)
        models, work = tmp / "models", tmp / "work"
        for d in MODEL_DIRS:
            (models / d).mkdir(parents=True)
        work.mkdir()
        flux_models.write_taef1(models / "vae_approx")
        with comfy_server(models, work) as comfy:
            object_info = comfy._call("/object_info")
            paths = [WORKFLOW_DIR / f"{n}.json" for n in names] if names else [
                p for p in WORKFLOWS if workflow_family(ui_to_api(load(p), object_info)) in TITLES]
            for path in paths:
                family, graph = family_graph(comfy, path, object_info, models, size=SIZE, steps=STEPS, seed=SEED)
                entry = comfy.run(graph)
                comfy.free()
                if entry["status"]["status_str"] != "success":
                    raise SystemExit(f"{path.name}: the graph failed: {comfy.error(entry)}")
                render, = comfy.images(entry)
                out = path.with_suffix(".jpg")
                thumbnail(render, family).save(out, "JPEG", quality=90)
                print(f"{out}: {render.shape[1]}x{render.shape[0]} render of {family}, {STEPS} steps, seed {SEED}")


if __name__ == "__main__":
    main(sys.argv[1:])
