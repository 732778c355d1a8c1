"""Refuse NaN and ±Inf in floating-point tensors read from a checkpoint file.

One NaN in a scale, a smoothing factor, a low-rank factor, a bias or a norm turns every image the model makes
into noise or black, with no error anywhere; the readers call require_finite on each float tensor as they
read it, so a corrupt file fails at load time naming the file and the key.
"""
from __future__ import annotations

import math

import torch

FIX = "the file is corrupt or was written by a broken quantizer; re-download or re-quantize it"

# float8 has no torch.isfinite (torch 2.13): test the bits. e4m3fn has no Inf; NaN is S.1111.111.
# e5m2 is IEEE-like: exponent 11111 is Inf (mantissa 0) or NaN.
_FLOAT8_NONFINITE = {torch.float8_e4m3fn: (0x7F, 0x7F), torch.float8_e5m2: (0x7C, 0x7C)}


def require_finite(t: torch.Tensor, where: str, error: type[ValueError] = ValueError) -> None:
    """Raise `error` when the floating-point tensor t holds a NaN or ±Inf; integer tensors pass.
    where: "<file>: <key>". The message gives the count, the first bad index (of the tensor as stored) and
    the fix."""
    if not t.is_floating_point():
        return
    if t.dtype in _FLOAT8_NONFINITE:
        mask, bits = _FLOAT8_NONFINITE[t.dtype]
        bad = (t.view(torch.uint8) & mask) == bits
    else:
        # Fast path: a NaN or ±Inf anywhere makes the sum NaN or ±Inf, so a finite sum proves every value
        # finite. A non-finite sum of finite values (overflow, e.g. an fp16 sum past 65504) falls through to
        # the exact test. The sum is one pass over memory that is being read anyway: 0.7 ms for a bf16
        # [3072, 4096] tensor, where torch.isfinite(t).all() takes 30-80 ms (2 cores, measured 2026-11).
        if torch.isfinite(t.sum()):
            return
        bad = ~torch.isfinite(t)
    count = int(bad.sum())
    if count == 0:
        return
    flat = int(bad.reshape(-1).nonzero()[0, 0])
    index = [int(i) for i in torch.unravel_index(torch.tensor(flat), t.shape)] if t.dim() else []
    value = t.reshape(-1)[flat].item()
    raise error(f"{where} holds {count} NaN/Inf value{'s' if count > 1 else ''} of {t.numel()} "
                f"(first at stored index {index}: {_show(value)}); {FIX}")


def _show(v: float) -> str:
    return "nan" if math.isnan(v) else ("+inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
