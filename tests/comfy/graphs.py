"""API-format graphs for the end-to-end tests: a model loader -> TinyFluxConditioning (test node: random
text conditioning, no text encoder) -> KSampler -> VAEDecode(taef1) -> SaveImage."""
from __future__ import annotations


def svdquant_loader(model_name: str, weight_dtype: str = "default") -> dict:
    return {"class_type": "SVDQuantFluxLoader", "inputs": {"model_name": model_name, "weight_dtype": weight_dtype}}


def unet_loader(model_name: str) -> dict:
    """ComfyUI's stock 'Load Diffusion Model'."""
    return {"class_type": "UNETLoader", "inputs": {"unet_name": model_name, "weight_dtype": "default"}}


def txt2img(loader: dict, *, seed: int = 42, steps: int = 4, size: int = 64, cond_seed: int = 0,
            prefix: str = "svdq") -> dict:
    """Node "1" is the loader; the output image comes from node "7"."""
    return {
        "1": loader,
        "2": {"class_type": "TinyFluxConditioning", "inputs": {"model": ["1", 0], "tokens": 8, "guidance": 3.5,
                                                                "seed": cond_seed}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        # cfg 1.0: the negative is not evaluated, but KSampler requires one
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": 1.0,
                                                  "sampler_name": "euler", "scheduler": "simple",
                                                  "positive": ["2", 0], "negative": ["2", 0],
                                                  "latent_image": ["3", 0], "denoise": 1.0}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": "taef1"}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["5", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def with_flux_guidance(graph: dict, guidance: float) -> dict:
    """Insert ComfyUI's FluxGuidance between the conditioning and the sampler (a stock node acting on the
    conditioning our model consumes)."""
    g = {k: {**v, "inputs": dict(v["inputs"])} for k, v in graph.items()}
    g["8"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": guidance}}
    g["4"]["inputs"]["positive"] = ["8", 0]
    g["4"]["inputs"]["negative"] = ["8", 0]
    return g


def with_model_sampling_flux(graph: dict, max_shift: float = 1.15, base_shift: float = 0.5, size: int = 64) -> dict:
    """Insert ComfyUI's ModelSamplingFlux (a model patch: clones our ModelPatcher and adds an object patch)."""
    g = {k: {**v, "inputs": dict(v["inputs"])} for k, v in graph.items()}
    g["9"] = {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": max_shift,
                                                            "base_shift": base_shift, "width": size, "height": size}}
    g["4"]["inputs"]["model"] = ["9", 0]
    return g
