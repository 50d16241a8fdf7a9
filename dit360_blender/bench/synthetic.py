"""Random-weight model sets in FLUX.1-dev's and DiT360's real file layouts, at any size.

The benchmark writes the full-size set (12B transformer, T5-XXL, CLIP-L, VAE, a rank-64 LoRA) to
measure speed and memory without downloading anything; the tokenizers are small synthetic
vocabularies (what matters for timing is the padded sequence length, not the words).

    root/FLUX.1-dev/flux1-dev.safetensors  ae.safetensors  text_encoder/  tokenizer/
                    text_encoder_2/  tokenizer_2/
    root/DiT360/adapter_model.safetensors  adapter_config.json
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..pipeline.flux_checkpoint import convert_bfl_to_diffusers
from ..pipeline.flux_model import FLUX_DEV, Flux, FluxParams
from ..pipeline.vae_model import FLUX_DEV_AE, AutoEncoder, AutoEncoderParams


@dataclass
class SyntheticSpec:
    flux: FluxParams = field(default_factory=lambda: FLUX_DEV)
    ae: AutoEncoderParams = field(default_factory=lambda: FLUX_DEV_AE)
    t5: dict = field(
        default_factory=lambda: dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
    )
    clip: dict = field(
        default_factory=lambda: dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
        )
    )
    lora_rank: int = 64


FULL = SyntheticSpec()
TINY = SyntheticSpec(
    flux=FluxParams(
        vec_in_dim=32, context_in_dim=32, hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1
    ),
    ae=AutoEncoderParams(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
    t5=dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    lora_rank=4,
)


def write_synthetic_models(root: Path, spec: SyntheticSpec, device: str = "cpu", seed: int = 0) -> Path:
    """Write the model set under `root` (see the module docstring); returns `root`."""
    root = Path(root)
    flux_dir = root / "FLUX.1-dev"
    flux_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    state = _random_flux_state(spec.flux, device)
    save_file(state, str(flux_dir / "flux1-dev.safetensors"))
    _write_lora(root / "DiT360", state, spec.flux, spec.lora_rank, seed)
    del state
    with torch.device(device):
        ae = AutoEncoder(spec.ae).to(torch.bfloat16)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in ae.state_dict().items()},
        str(flux_dir / "ae.safetensors"),
    )
    del ae
    clip_vocab = write_clip_tokenizer(flux_dir / "tokenizer")
    t5_vocab = write_t5_tokenizer(flux_dir / "tokenizer_2")
    _write_text_models(flux_dir, spec, clip_vocab, t5_vocab, device)
    return root


def _random_flux_state(params: FluxParams, device: str) -> dict[str, torch.Tensor]:
    """Default PyTorch init (uniform ±1/sqrt(fan_in)) in bf16, built block by block on `device`."""
    with torch.device("meta"):
        model = Flux(params)
    state = {}
    for name, tensor in model.state_dict().items():
        shape = tensor.shape
        if name.endswith("scale") or (tensor.ndim == 1 and "norm" in name):
            value = torch.ones(shape, device=device)
        else:
            fan_in = shape[1] if len(shape) == 2 else shape[0]
            value = (torch.rand(shape, device=device) * 2 - 1) / fan_in**0.5
        state[name] = value.to(torch.bfloat16).cpu()
    return state


def _write_lora(folder: Path, state: dict, params: FluxParams, rank: int, seed: int) -> None:
    """A DiT360-format LoRA: attn.to_q/k/v/to_out.0 of every block, `transformer.` prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed + 7)
    shapes = {k: v.shape for k, v in convert_bfl_to_diffusers(state, params).items()}
    lora = {}
    for key, shape in shapes.items():
        stem = key.removesuffix(".weight")
        if not key.endswith(".weight") or not stem.endswith(
            ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
        ):
            continue
        out_features, in_features = shape
        lora[f"transformer.{stem}.lora_A.weight"] = (
            torch.randn(rank, in_features, generator=gen) / in_features**0.5
        ).to(torch.bfloat16)
        lora[f"transformer.{stem}.lora_B.weight"] = (
            torch.randn(out_features, rank, generator=gen) * 1e-3
        ).to(torch.bfloat16)
    save_file(lora, str(folder / "adapter_model.safetensors"))
    config = {
        "r": rank,
        "lora_alpha": rank,
        "peft_type": "LORA",
        "target_modules": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def _write_text_models(
    flux_dir: Path, spec: SyntheticSpec, clip_vocab: int, t5_vocab: int, device: str
) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_config = CLIPTextConfig(
        vocab_size=max(49408, clip_vocab) if spec is FULL else clip_vocab,
        max_position_embeddings=77,
        projection_dim=spec.clip["hidden_size"],
        hidden_act="quick_gelu",
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        **spec.clip,
    )
    t5_config = T5Config(
        vocab_size=32128 if spec is FULL else (t5_vocab + 31) // 32 * 32,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        tie_word_embeddings=False,
        num_decoder_layers=spec.t5["num_layers"],
        **spec.t5,
    )
    for folder, cls, config in (
        ("text_encoder", CLIPTextModel, clip_config),
        ("text_encoder_2", T5EncoderModel, t5_config),
    ):
        with torch.device(device):
            model = cls(config).to(torch.bfloat16)
        model.save_pretrained(flux_dir / folder, max_shard_size="5GB")
        del model


def write_clip_tokenizer(folder: Path) -> int:
    """A byte-level BPE vocabulary (256 bytes, their `</w>` forms, bos/eos with the highest ids)."""
    from transformers import CLIPTokenizer

    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tok.save_pretrained(folder)
    return len(vocab)


def write_t5_tokenizer(folder: Path) -> int:
    """A unigram vocabulary of single letters and a few hundred syllables (pad 0, eos 1, unk 2)."""
    from transformers import T5TokenizerFast

    syllables = [a + b for a in string.ascii_lowercase for b in "aeiouy"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + s, -2.0) for s in syllables] + [
        (c, -5.0) for c in string.ascii_lowercase + string.digits
    ]
    tok = T5TokenizerFast(vocab=pieces, extra_ids=100, model_max_length=512)
    tok.save_pretrained(folder)
    return len(tok)
