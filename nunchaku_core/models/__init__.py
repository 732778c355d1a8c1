"""Per-family knowledge as data: which Linears of a diffusion model are quantized how (policies.py)."""
