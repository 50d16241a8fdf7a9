"""TextEncoders against diffusers' FluxPipeline.encode_prompt, on a tiny random FLUX.1-dev layout."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from tiny_flux_repo import build_tiny_text_stack

from dit360_blender.pipeline.errors import BadCheckpointError, DeviceError, WeightsMissingError
from dit360_blender.pipeline.text_encoders import TextEncoders

PROMPTS = [
    "a panoramic view of the mountains at sunset, 360 degrees, equirectangular",
    "Café über naïve façade — 東京の夜景 🌃 ¡hola! 123",
    # Far past 512 T5 tokens and 77 CLIP tokens: both encoders truncate.
    " ".join(f"mountain{i} forest river cloud snow desert kalo mine raxo" for i in range(120)),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_tiny_text_stack(tmp_path_factory.mktemp("flux") / "FLUX.1-dev", seed=0)


@pytest.fixture(scope="module")
def ours(stack: dict) -> TextEncoders:
    return TextEncoders.load_from_repo(stack["root"], dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(stack: dict):
    """diffusers' FluxPipeline holding only the text half (vae and transformer are None)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(stack["scheduler"]),
        text_encoder=CLIPTextModel.from_pretrained(stack["text_encoder"], dtype=torch.float32),
        tokenizer=CLIPTokenizer.from_pretrained(stack["tokenizer"]),
        text_encoder_2=T5EncoderModel.from_pretrained(stack["text_encoder_2"], dtype=torch.float32),
        tokenizer_2=T5TokenizerFast.from_pretrained(stack["tokenizer_2"]),
        vae=None,
        transformer=None,
    )


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("max_length", [512, 256])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["plain", "unicode", "long"])
def test_matches_diffusers_encode_prompt(ours, reference, stack, prompt: str, max_length: int) -> None:
    t5_hidden, clip_pooled = ours.encode(prompt, max_length=max_length)
    with torch.inference_mode():
        ref_t5, ref_pooled, _ = reference.encode_prompt(prompt, prompt_2=None, max_sequence_length=max_length)

    assert t5_hidden.shape == (1, max_length, stack["t5_dim"]) == ref_t5.shape
    assert clip_pooled.shape == (1, stack["clip_dim"]) == ref_pooled.shape
    assert t5_hidden.dtype == clip_pooled.dtype == torch.float32
    assert _rel_err(t5_hidden, ref_t5) <= 1e-6
    assert _rel_err(clip_pooled, ref_pooled) <= 1e-6
    # The random weights must give non-trivial outputs, or the comparison proves nothing.
    assert torch.isfinite(t5_hidden).all() and t5_hidden.std() > 0.05 and clip_pooled.std() > 0.05


def test_tokenizers_see_real_text(ours, stack) -> None:
    """Guards against a degenerate tokenizer (all <unk>) that would make the parity test hollow."""
    t5_ids = ours.t5_tokenizer(PROMPTS[0])["input_ids"]
    clip_ids = ours.clip_tokenizer(PROMPTS[1])["input_ids"]
    assert len(set(t5_ids)) > 10 and ours.t5_tokenizer.unk_token_id not in t5_ids
    assert (
        clip_ids[0] == ours.clip_tokenizer.bos_token_id and clip_ids[-1] == ours.clip_tokenizer.eos_token_id
    )
    assert len(set(clip_ids)) > 20
    # The T5 tokenizer (converted by transformers) must agree with sentencepiece itself.
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(stack["tokenizer_2"] / "spiece.model"))
    for prompt in PROMPTS[:2]:
        assert ours.t5_tokenizer(prompt)["input_ids"] == sp.encode(prompt) + [ours.t5_tokenizer.eos_token_id]
    a, pa = ours.encode(PROMPTS[0])
    b, pb = ours.encode(PROMPTS[1])
    assert _rel_err(a, b) > 0.01 and _rel_err(pa, pb) > 0.01


def test_long_prompt_logs_truncation(ours, caplog: pytest.LogCaptureFixture) -> None:
    t5_tokens, clip_tokens = ours.count_tokens(PROMPTS[2])
    assert t5_tokens > 512 and clip_tokens > 77
    with caplog.at_level(logging.WARNING, logger="dit360_blender.pipeline.text_encoders"):
        ours.encode(PROMPTS[2])
    messages = [r.getMessage() for r in caplog.records]
    assert any("T5 tokens" in m and "only 512" in m for m in messages)
    assert any("CLIP tokens" in m and "only 77" in m for m in messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dit360_blender.pipeline.text_encoders"):
        ours.encode(PROMPTS[0])
    assert not caplog.records


def test_bfloat16_default_and_unload(stack) -> None:
    enc = TextEncoders.load_from_repo(stack["root"])
    assert enc.t5_dim == stack["t5_dim"] and enc.clip_dim == stack["clip_dim"]
    t5_hidden, clip_pooled = enc.encode("sunset over the sea")
    assert t5_hidden.dtype == clip_pooled.dtype == torch.bfloat16
    assert enc.to("cpu") is enc
    enc.unload()
    assert not enc.loaded and enc.t5 is None and enc.clip is None


def _copy(stack: dict, tmp_path: Path) -> Path:
    root = tmp_path / "FLUX.1-dev"
    shutil.copytree(stack["root"], root)
    return root


def test_missing_tokenizer_folder(stack, tmp_path: Path) -> None:
    root = _copy(stack, tmp_path)
    shutil.rmtree(root / "tokenizer")
    with pytest.raises(WeightsMissingError) as info:
        TextEncoders.load_from_repo(root, dtype=torch.float32)
    assert "`tokenizer/`" in info.value.message and str(root / "tokenizer") in info.value.message
    assert info.value.hint


def test_incomplete_tokenizer_folder(stack, tmp_path: Path) -> None:
    root = _copy(stack, tmp_path)
    (root / "tokenizer_2" / "tokenizer.json").unlink()
    (root / "tokenizer_2" / "spiece.model").unlink()
    with pytest.raises(WeightsMissingError, match="tokenizer_2"):
        TextEncoders.load_from_repo(root, dtype=torch.float32)


def test_truncated_shard(stack, tmp_path: Path) -> None:
    root = _copy(stack, tmp_path)
    shard = max((root / "text_encoder_2").glob("model-*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadCheckpointError, match="truncated") as info:
        TextEncoders.load_from_repo(root, dtype=torch.float32)
    assert shard.name in str(info.value) and "download" in info.value.hint.lower()


def test_missing_shard(stack, tmp_path: Path) -> None:
    root = _copy(stack, tmp_path)
    min((root / "text_encoder_2").glob("model-*.safetensors")).unlink()
    with pytest.raises(WeightsMissingError, match="model-00001-of-"):
        TextEncoders.load_from_repo(root, dtype=torch.float32)


def test_swapped_encoders(stack) -> None:
    with pytest.raises(BadCheckpointError, match="t5"):
        TextEncoders.load(
            stack["text_encoder_2"], stack["tokenizer"], stack["text_encoder"], stack["tokenizer_2"]
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device(stack) -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        TextEncoders.load_from_repo(stack["root"], device="cuda")
