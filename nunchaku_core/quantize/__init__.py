"""The quantizer: the SVDQuant algorithm on one layer (svdquant.py), whole models into ComfyUI's layout (model.py) or
Nunchaku's FLUX.1 format (flux.py), the 4-bit T5 (t5.py), calibration files and the command line."""
