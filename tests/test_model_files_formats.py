"""The model files people already have: a diffusers-format FLUX.1-dev in the Hugging Face cache,
ComfyUI's all-in-one and scaled-fp8 checkpoints — found, loaded, and what is missing named."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from dit360_blender.pipeline.errors import WeightsMissingError
from dit360_blender.pipeline.flux_checkpoint import load_flux_transformer
from dit360_blender.pipeline.model_files.download import resolve_model_paths
from dit360_blender.pipeline.model_files.local_search import find_model_paths

SNAPSHOT = "c" * 40


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty private Hugging Face cache (huggingface_hub read its environment at import)."""
    hub = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    return hub


def cache_repo(hub: Path, repo: str, source: Path, skip: tuple[str, ...] = ()) -> Path:
    """Lay `source`'s files out as huggingface_hub does: blobs, snapshots/<commit>/ symlinks, refs/main."""
    base = hub / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / SNAPSHOT
    for file in sorted(source.rglob("*")):
        rel = file.relative_to(source)
        if not file.is_file() or rel.as_posix() in skip:
            continue
        blob = base / "blobs" / f"{abs(hash(rel.as_posix())):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(SNAPSHOT)
    return snapshot


def test_diffusers_flux_in_the_hf_cache_is_found_and_loads(tiny_models, hf_cache):
    """The cache holds FLUX.1-dev as diffusers downloads it (transformer/ + vae/, no single files)."""
    flux = cache_repo(
        hf_cache,
        "black-forest-labs/FLUX.1-dev",
        tiny_models["flux"],
        skip=("flux1-dev.safetensors", "ae.safetensors"),
    )
    cache_repo(hf_cache, "Insta360-Research/DiT360-Panorama-Image-Generation", tiny_models["root"] / "DiT360")
    paths = resolve_model_paths()  # no download allowed: raises if anything counts as missing
    assert paths.transformer == flux / "transformer"
    assert paths.vae == flux / "vae"
    assert paths.text_encoder_2 == flux / "text_encoder_2"
    # the folder found is the same model as BFL's single file
    ours = load_flux_transformer(paths.transformer, torch.float32)
    reference = load_file(str(tiny_models["flux"] / "flux1-dev.safetensors"))
    state = ours.state_dict()
    assert set(state) == set(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_incomplete_diffusers_folder_in_the_cache_does_not_count(tiny_models, hf_cache):
    flux = cache_repo(
        hf_cache,
        "black-forest-labs/FLUX.1-dev",
        tiny_models["flux"],
        skip=("flux1-dev.safetensors", "ae.safetensors", "vae/config.json"),
    )
    found = find_model_paths(use_lora=False)
    assert found["transformer"] == flux / "transformer"
    assert found["vae"] is None
    with pytest.raises(WeightsMissingError) as err:
        resolve_model_paths(use_lora=False)
    assert "vae/ folder has no config.json" in err.value.message


# --- ComfyUI scaled fp8 ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base():
    from flux_fixtures import tiny_diffusers_transformer

    return tiny_diffusers_transformer(seed=21)


@pytest.fixture(scope="module")
def bfl(base, tmp_path_factory):
    from dit360_blender.pipeline.flux_checkpoint import iter_bfl_tensors

    folder = tmp_path_factory.mktemp("comfy") / "transformer"
    base.save_pretrained(folder, safe_serialization=True)
    return {k: v.contiguous() for k, v in iter_bfl_tensors(folder)}


def reference_with(base, bfl_weights: dict[str, torch.Tensor]):
    """diffusers' transformer holding exactly these (dequantised) weights."""
    import copy

    from flux_fixtures import diffusers_state_from_bfl, tiny_params

    ref = copy.deepcopy(base)
    state = {k: v.float() for k, v in bfl_weights.items()}
    ref.load_state_dict(diffusers_state_from_bfl(state, tiny_params(base)), strict=True)
    return ref.eval()


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_comfy_scaled_fp8_loads_and_dequantises_with_its_scales(base, bfl, tmp_path, prefix):
    from comfy_files import scaled_fp8_state
    from flux_fixtures import TINY_AXES
    from test_parity_transformer import rel_err, run_both

    state, dequantised = scaled_fp8_state(bfl, prefix)
    path = tmp_path / "flux1-dev-fp8-scaled.safetensors"
    save_file(state, str(path))
    ours = load_flux_transformer(path, torch.float32, axes_dim=TINY_AXES)
    layer = ours.double_blocks[0].img_attn.qkv
    assert layer.weight.dtype == torch.float8_e4m3fn
    # the weight seen by the matmul is fp8 * scale_weight, exactly
    want = dequantised["double_blocks.0.img_attn.qkv.weight"]
    assert torch.allclose(layer.dequantized(torch.float64), want, rtol=1e-6, atol=0)
    got, expected = run_both(ours, reference_with(base, dequantised), 4, 8, wrap=True)
    assert rel_err(got, expected) <= 1e-5


# --- ComfyUI all-in-one checkpoints -------------------------------------------------------------


def _wide_clip(folder: Path, vocab_size: int) -> dict:
    """A tiny CLIP text model with CLIP's 64-wide heads (2 of them), saved as FLUX.1-dev's
    text_encoder/ would be (FLUX.1-dev's config values; the tiny stack's CLIP has 8-wide heads)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=128, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(3)
    model = CLIPTextModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(folder)
    # ComfyUI's files keep transformers' classic names, `text_model.…` (transformers 5 saves none)
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in model.state_dict().items()}


def _t5_state(flux: Path) -> dict:
    t5: dict = {}
    for shard in sorted((flux / "text_encoder_2").glob("*.safetensors")):
        t5.update(load_file(str(shard)))
    return t5


@pytest.mark.parametrize("text_root", ["text_encoders.", "cond_stage_model."])
def test_all_in_one_checkpoint_gives_every_part_it_holds(tiny_models, tmp_path, hf_cache, text_root):
    from comfy_files import write_all_in_one

    from dit360_blender.pipeline.text_encoders import TextEncoders
    from dit360_blender.pipeline.vae_checkpoint import load_autoencoder

    flux = tiny_models["flux"]
    reference_folders = tmp_path / "reference"
    for folder in ("tokenizer", "text_encoder_2", "tokenizer_2"):
        shutil.copytree(flux / folder, reference_folders / folder)
    vocab = len(TextEncoders.load_from_repo(flux).clip_tokenizer)
    clip = _wide_clip(reference_folders / "text_encoder", vocab)
    aio = write_all_in_one(
        tmp_path / "checkpoints" / "flux1-dev-aio.safetensors",
        load_file(str(flux / "flux1-dev.safetensors")),
        load_file(str(flux / "ae.safetensors")),
        clip,
        _t5_state(flux),
        text_root,
    )
    models = tmp_path / "models"
    for folder in ("tokenizer", "tokenizer_2"):  # what such a checkpoint never holds
        shutil.copytree(flux / folder, models / "FLUX.1-dev" / folder)
    paths = resolve_model_paths(explicit={"transformer": aio}, models_dir=models, use_lora=False)
    assert paths.transformer == paths.vae == paths.text_encoder == paths.text_encoder_2 == aio
    assert paths.tokenizer == models / "FLUX.1-dev" / "tokenizer"

    ours = load_flux_transformer(paths.transformer, torch.float32).state_dict()
    reference = load_file(str(flux / "flux1-dev.safetensors"))
    assert set(ours) == set(reference) and all(torch.equal(ours[k], reference[k]) for k in reference)
    vae = load_autoencoder(paths.vae).state_dict()
    ae = load_file(str(flux / "ae.safetensors"))
    assert set(vae) == set(ae) and all(torch.equal(vae[k], ae[k]) for k in ae)
    # the text encoders out of the checkpoint encode as transformers' own loading of the folders
    got = TextEncoders.load(paths.text_encoder, paths.tokenizer, paths.text_encoder_2, paths.tokenizer_2,
                            dtype=torch.float32)  # fmt: skip
    want = TextEncoders.load_from_repo(reference_folders, dtype=torch.float32)
    for a, b in zip(got.encode("a harbour at dawn", 16), want.encode("a harbour at dawn", 16), strict=True):
        assert b.abs().max() > 0 and torch.equal(a, b)

    # without a tokenizer anywhere, the message names it, says the checkpoint was looked at (and
    # what it holds), and where to put the missing files
    shutil.rmtree(models / "FLUX.1-dev" / "tokenizer_2")
    with pytest.raises(WeightsMissingError) as err:
        resolve_model_paths(explicit={"transformer": aio}, models_dir=models, use_lora=False)
    first, *rest = err.value.message.splitlines()
    assert "tokenizer_2" in first and "text_encoder_2" not in first and "vae" not in first
    assert any(str(aio) in line and "T5-XXL" in line for line in rest)
    assert str(models / "FLUX.1-dev" / "tokenizer_2" / "spiece.model") in err.value.hint


def test_all_in_one_without_text_encoders_takes_them_from_the_folders(tiny_models, tmp_path, hf_cache):
    from comfy_files import write_all_in_one

    flux = tiny_models["flux"]
    aio = write_all_in_one(
        tmp_path / "aio.safetensors",
        load_file(str(flux / "flux1-dev.safetensors")),
        load_file(str(flux / "ae.safetensors")),
    )
    paths = resolve_model_paths(explicit={"transformer": aio}, models_dir=tiny_models["root"], use_lora=False)
    assert paths.vae == aio and paths.text_encoder == flux / "text_encoder"


def test_transformer_only_checkpoint_takes_no_vae_from_it(tiny_models, tmp_path, hf_cache):
    from comfy_files import write_all_in_one

    flux = tiny_models["flux"]
    unet = write_all_in_one(
        tmp_path / "unet.safetensors", load_file(str(flux / "flux1-dev.safetensors")), None
    )
    found = find_model_paths(explicit={"transformer": unet}, use_lora=False)
    assert found["transformer"] == unet and found["vae"] is None


def test_gguf_file_is_not_called_truncated(tmp_path):
    from dit360_blender.pipeline.model_files.safetensors_header import safetensors_problem

    path = tmp_path / "flux1-dev-Q8_0.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(64))
    problem = safetensors_problem(path)
    assert problem is not None and problem.kind == "foreign" and "GGUF" in problem.text


def test_fp8_text_encoder_tensors_are_dequantised_with_their_scale(tmp_path):
    """ComfyUI's fp8 all-in-one files store T5 in float8 (optionally with a scale per tensor)."""
    from dit360_blender.pipeline.text_checkpoint import _read_part

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=gen)
    scale = w.abs().amax() / 448
    q = (w / scale).to(torch.float8_e4m3fn)
    prefix = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention."
    save_file(
        {
            f"{prefix}q.weight": q,
            f"{prefix}q.scale_weight": scale.reshape(()),
            f"{prefix}k.weight": q.clone(),  # unscaled
            "model.diffusion_model.img_in.weight": torch.randn(4, 4),
        },
        str(tmp_path / "aio.safetensors"),
    )
    state = _read_part(tmp_path / "aio.safetensors", "t5xxl.transformer.", torch.float32)
    assert set(state) == {
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.block.0.layer.0.SelfAttention.k.weight",
    }
    expected = q.double() * scale.double()
    assert torch.allclose(
        state["encoder.block.0.layer.0.SelfAttention.q.weight"].double(), expected, rtol=1e-6
    )
    assert torch.equal(state["encoder.block.0.layer.0.SelfAttention.k.weight"], q.float())
