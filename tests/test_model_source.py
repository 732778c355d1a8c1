"""The quantizer's input reader (nunchaku_core/models/model_source.py, models/pixart_diffusers.py): a PixArt-Sigma
transformer in diffusers' layout and as the original release's torch.save'd {"state_dict": ...} `.pth` are read
under ComfyUI's PixArt names, and quantize to exactly the file the ComfyUI-named model gives. The diffusers
conversion is compared with ComfyUI's own (comfy.model_detection.convert_diffusers_mmdit, the host under test).

The diffusers file is made here from a ComfyUI-named random model by splitting the fused Linears with
torch.chunk and renaming with the table below: written from diffusers' PixArtTransformer2DModel names,
independently of the reader's table."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import family_models
from nunchaku_core.models.model_source import ModelSourceError, open_model_source
from nunchaku_core.quantize.flux import QuantizeOptions
from nunchaku_core.quantize.model import quantize_model

# ComfyUI (PixArt) name prefix -> diffusers name prefix, for the tensors that are renamed only
RENAMED = [("blocks.{i}.attn.proj.", "transformer_blocks.{i}.attn1.to_out.0."),
           ("blocks.{i}.cross_attn.q_linear.", "transformer_blocks.{i}.attn2.to_q."),
           ("blocks.{i}.cross_attn.proj.", "transformer_blocks.{i}.attn2.to_out.0."),
           ("blocks.{i}.mlp.fc1.", "transformer_blocks.{i}.ff.net.0.proj."),
           ("blocks.{i}.mlp.fc2.", "transformer_blocks.{i}.ff.net.2."),
           ("blocks.{i}.scale_shift_table", "transformer_blocks.{i}.scale_shift_table"),
           ("x_embedder.proj.", "pos_embed.proj."),
           ("t_embedder.mlp.0.", "adaln_single.emb.timestep_embedder.linear_1."),
           ("t_embedder.mlp.2.", "adaln_single.emb.timestep_embedder.linear_2."),
           ("t_block.1.", "adaln_single.linear."),
           ("y_embedder.y_proj.fc1.", "caption_projection.linear_1."),
           ("y_embedder.y_proj.fc2.", "caption_projection.linear_2."),
           ("y_embedder.y_embedding", "caption_projection.y_embedding"),
           ("final_layer.linear.", "proj_out."),
           ("final_layer.scale_shift_table", "scale_shift_table")]
DEPTH = 2


def to_diffusers(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        i = k.split(".")[1] if k.startswith("blocks.") else None
        if k.endswith(("attn.qkv.weight", "attn.qkv.bias")) and ".cross_attn." not in k:
            for part, t in zip(("to_q", "to_k", "to_v"), torch.chunk(v, 3, dim=0)):
                out[f"transformer_blocks.{i}.attn1.{part}.{k.rsplit('.', 1)[1]}"] = t.clone()
            continue
        if ".cross_attn.kv_linear." in k:
            for part, t in zip(("to_k", "to_v"), torch.chunk(v, 2, dim=0)):
                out[f"transformer_blocks.{i}.attn2.{part}.{k.rsplit('.', 1)[1]}"] = t.clone()
            continue
        for ours, theirs in RENAMED:
            ours, theirs = ours.format(i=i), theirs.format(i=i)
            if k == ours or (ours.endswith(".") and k.startswith(ours)):
                out[theirs + k[len(ours):]] = v
                break
        else:
            raise AssertionError(f"test table lacks {k}")
    return out


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    d = tmp_path_factory.mktemp("pixart")
    sd = family_models.random_state_dict(family_models.pixart_sigma_shapes(depth=DEPTH), std=0.05, seed=3)
    save_file(sd, str(d / "native.safetensors"))
    return d, sd


def _tensors(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _quantized(src, out) -> dict:
    quantize_model(src, out, options=QuantizeOptions(rank=8, report=False))
    return _tensors(out)


@pytest.fixture(scope="module")
def native_int4(pixart):
    d, _ = pixart
    return _quantized(d / "native.safetensors", d / "native-int4.safetensors")


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_pixart_diffusers_reads_as_comfyui_names(pixart):
    d, sd = pixart
    diff = to_diffusers(sd)
    diff["transformer_blocks.0.attn1.extra_norm.weight"] = torch.ones(4)     # a name with no place in the model
    save_file(diff, str(d / "diffusers.safetensors"))
    src = open_model_source(d / "diffusers.safetensors")
    assert src.layout == "pixart diffusers"
    assert sorted(src.keys) == sorted(sd)
    for k, v in sd.items():
        assert src.shape(k) == tuple(v.shape) and torch.equal(src.read(k), v), k
    assert src.dropped == ["transformer_blocks.0.attn1.extra_norm.weight"]


def test_pixart_diffusers_conversion_matches_comfyui(pixart):
    """Our table against the host's own: the same keys, the same tensors (ComfyUI fuses q/k/v with the same
    row order)."""
    from comfy_inprocess import import_pack
    import_pack()
    import comfy.model_detection
    d, sd = pixart
    theirs = comfy.model_detection.convert_diffusers_mmdit(to_diffusers(sd), "")
    src = open_model_source(d / "diffusers.safetensors")
    assert sorted(theirs) == sorted(src.keys)
    for k in theirs:
        assert torch.equal(src.read(k), theirs[k]), k


def test_pixart_diffusers_quantizes_to_the_native_file(pixart, native_int4):
    d, _ = pixart
    got = _quantized(d / "diffusers.safetensors", d / "diffusers-int4.safetensors")
    _assert_same(got, native_int4)


def test_pixart_pth_release_layout(pixart, native_int4):
    """The original release: torch.save({"state_dict": ..., other entries}), zip format; and the legacy format,
    which torch cannot memory-map (read without mmap)."""
    d, sd = pixart
    torch.save({"state_dict": sd, "epoch": 3}, d / "release.pth")
    _assert_same(_quantized(d / "release.pth", d / "pth-int4.safetensors"), native_int4)
    torch.save(sd, d / "legacy.pt", _use_new_zipfile_serialization=False)
    src = open_model_source(d / "legacy.pt")
    assert src.layout == "as stored" and all(torch.equal(src.read(k), v) for k, v in sd.items())


class _Code:
    def __reduce__(self):
        return (print, ("a pickle that runs code",))


def test_unsafe_or_odd_pth_refused(tmp_path):
    with open(tmp_path / "code.pth", "wb") as f:
        pickle.dump({"state_dict": {"w": _Code()}}, f)
    with pytest.raises(ModelSourceError, match=r"code\.pth: not loadable as plain tensors .*weights_only"):
        open_model_source(tmp_path / "code.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ModelSourceError, match=r"list\.pt: holds a list, not a dict of tensors"):
        open_model_source(tmp_path / "list.pt")
    with pytest.raises(ModelSourceError, match="no such file"):
        open_model_source(tmp_path / "absent.pth")


def test_incomplete_pixart_diffusers_refused(pixart, tmp_path):
    _, sd = pixart
    diff = to_diffusers(sd)
    del diff["transformer_blocks.1.attn1.to_k.weight"]
    save_file(diff, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ModelSourceError, match=r"broken\.safetensors: a diffusers-layout PixArt transformer, incomplete: "
                                               r"blocks\.1\.attn\.qkv\.weight .* transformer_blocks\.1\.attn1\.to_k\.weight "
                                               r"is missing"):
        open_model_source(tmp_path / "broken.safetensors")
