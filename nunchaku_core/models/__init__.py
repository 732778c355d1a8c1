"""Per-family knowledge as data: which Linears of a diffusion model are quantized how (policies.py), and reading
unquantized model files under ComfyUI's names (model_source.py; FLUX.1 for Nunchaku's format: flux_source.py)."""
