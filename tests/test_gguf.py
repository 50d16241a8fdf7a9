"""GGUF transformers (city96-style FLUX GGUFs): our torch dequantisation against gguf's own numpy
one, the layer kept quantised, and whole models against the same weights in safetensors."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_files import QUANTISABLE, random_blocks, write_flux_gguf
from safetensors.torch import load_file, save_file

from dit360_blender.pipeline.errors import BadCheckpointError
from dit360_blender.pipeline.flux_checkpoint import load_flux_transformer
from dit360_blender.pipeline.gguf_checkpoint import GGUFLinear
from dit360_blender.pipeline.gguf_quants import dequantize
from dit360_blender.pipeline.model_files.local_search import find_model_paths

ALL_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_dequantisation_matches_gguf_numpy(qtype):
    rows, cols = 5, 512
    if qtype in QUANTISABLE:
        weights = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32)
        raw = gguf.quants.quantize(weights, qtype)
    else:
        raw = random_blocks(rows, cols, qtype, seed=2, magnitude=0.01)
    expected = gguf.quants.dequantize(raw, qtype)
    got = dequantize(torch.from_numpy(raw), int(qtype), (rows, cols))
    assert got.dtype == torch.float32 and got.shape == (rows, cols)
    assert np.abs(expected).max() > 0
    np.testing.assert_array_equal(got.numpy(), expected)
    if qtype in QUANTISABLE:  # and it really is the weights, up to the quantisation
        assert np.abs(expected - weights).max() < 0.25 * np.abs(weights).max()


@pytest.fixture(scope="module")
def flux(tiny_models):
    """The tiny FLUX (head dim 128, hidden 256: rows are whole K-quant super-blocks) in BFL keys."""
    return load_file(str(tiny_models["flux"] / "flux1-dev.safetensors"))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_1, Q.Q4_K, Q.Q6_K, Q.Q3_K], ids=lambda q: q.name)
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_gguf_transformer_keeps_blocks_quantised_and_matches_safetensors(flux, tmp_path, qtype, prefix):
    from test_parity_transformer import rel_err

    path = tmp_path / f"flux1-dev-{qtype.name}.gguf"
    held = write_flux_gguf(path, flux, qtype, prefix)
    st = tmp_path / "same.safetensors"
    save_file({k: v.contiguous() for k, v in held.items()}, str(st))
    ours = load_flux_transformer(path, torch.float32)
    reference = load_flux_transformer(st, torch.float32)
    layer = ours.double_blocks[0].img_attn.qkv
    assert isinstance(layer, GGUFLinear) and layer.weight.dtype == torch.uint8
    assert not isinstance(ours.img_in, GGUFLinear)  # embedders are F32 in the file, plain Linear here
    w = held["double_blocks.0.img_attn.qkv.weight"]
    assert torch.equal(layer.dequantized(torch.float32), w)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, w.shape[1], generator=gen)
    assert torch.allclose(layer(x), x @ w.T + held["double_blocks.0.img_attn.qkv.bias"], atol=1e-4)
    got = _run(ours)
    assert rel_err(got, _run(reference)) <= 1e-5
    bytes_q = sum(b.numel() for n, b in ours.named_buffers() if n.endswith("weight"))
    bytes_f = sum(
        p.numel() * 4 for n, p in reference.named_parameters() if n.startswith(("double", "single"))
    )
    assert bytes_q < bytes_f / 3  # the blocks take their quantised size, not float32's


def _run(model):
    from dit360_blender.pipeline.sampling import image_ids

    gen = torch.Generator().manual_seed(4)
    ids = image_ids(2, 4)[None]
    img = torch.randn(1, 8, 64, generator=gen)
    txt = torch.randn(1, 5, model.params.context_in_dim, generator=gen)
    vec = torch.randn(1, model.params.vec_in_dim, generator=gen)
    with torch.no_grad():
        return model(img, ids, txt, torch.zeros(1, 5, 3), torch.tensor([0.4]), vec, torch.tensor([2.8]))


def test_gguf_q8_generation_matches_the_safetensors_model(tiny_models, tiny_paths, tmp_path):
    """A whole panorama from the Q8_0 GGUF of the tiny FLUX against the original file."""
    from dit360_blender.pipeline.dit360 import DiT360Pipeline, GenerateRequest

    flux = load_file(str(tiny_models["flux"] / "flux1-dev.safetensors"))
    path = tmp_path / "flux1-dev-Q8_0.gguf"
    write_flux_gguf(path, flux, Q.Q8_0)
    request = dict(prompt="A canyon at noon", seed=5, steps=3, width=128, height=64)
    images = []
    for transformer in (path, tiny_paths.transformer):
        paths = dataclasses.replace(tiny_paths, transformer=transformer)
        pipe = DiT360Pipeline.load(paths, device="cpu", dtype="fp32")
        images.append(pipe.generate(GenerateRequest(**request)).image)
    err = ((images[0] - images[1]).norm() / images[1].norm()).item()
    # Q8_0 keeps ~8 bits per weight: the image moves by well under a percent, but it does move
    assert 0 < err < 1e-2, err


def test_gguf_is_found_by_its_explicit_path_and_damage_is_named(flux, tmp_path):
    path = tmp_path / "flux1-dev-Q4_0.gguf"
    write_flux_gguf(path, flux, Q.Q4_0)
    assert find_model_paths(explicit={"transformer": path}, use_lora=False)["transformer"] == path
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BadCheckpointError, match="incomplete") as err:
        load_flux_transformer(cut, torch.float32)
    assert "download" in err.value.hint


def test_gguf_of_another_model_is_refused(tmp_path):
    path = tmp_path / "t5-Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), arch="t5encoder")
    writer.add_tensor("enc.blk.0.attn_q.weight", np.ones((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BadCheckpointError, match="t5encoder"):
        load_flux_transformer(path, torch.float32)


def test_gguf_with_loras_runs_them_beside_the_blocks(flux, tiny_models, tmp_path):
    """The DiT360 LoRA (and a user's) on a GGUF: a side path beside the quantised blocks, equal to
    merging them into the same (dequantised) weights; the fp8 memory mode keeps the GGUF blocks."""
    from test_parity_transformer import rel_err

    from dit360_blender.pipeline.flux_checkpoint import infer_params, read_shapes
    from dit360_blender.pipeline.lora import LoraMerger, LowRankPath, load_lora

    path = tmp_path / "flux1-dev-Q4_K.gguf"
    held = write_flux_gguf(path, flux, Q.Q4_K)
    st = tmp_path / "same.safetensors"
    save_file({k: v.contiguous() for k, v in held.items()}, str(st))
    params = infer_params(read_shapes(path))

    def merger():
        return LoraMerger(load_lora(tiny_models["lora"]), params, 0.9)

    ours = load_flux_transformer(path, torch.float32, merge=merger(), quantize_fp8=True)
    qkv = ours.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, GGUFLinear) and isinstance(qkv.lora, LowRankPath)
    reference = load_flux_transformer(st, torch.float32, merge=merger())
    plain = load_flux_transformer(st, torch.float32)
    assert rel_err(_run(ours), _run(reference)) <= 1e-5
    assert rel_err(_run(plain), _run(reference)) > 1e-3  # the LoRA matters
