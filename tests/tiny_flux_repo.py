"""Tiny random-weight stand-ins for FLUX.1-dev's repository, written in its real folder layout.

Nothing here is downloaded: the tokenizers are built from vocabularies generated in code and the
models get random (non-zero) weights, so tests can exercise the real loading code paths quickly.

Layout written by :func:`build_tiny_text_stack` (as in ``black-forest-labs/FLUX.1-dev``)::

    model_index.json
    scheduler/scheduler_config.json
    text_encoder/      config.json, model.safetensors              (CLIPTextModel)
    tokenizer/         vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    text_encoder_2/    config.json, model-0000i-of-0000n.safetensors, model.safetensors.index.json
    tokenizer_2/       spiece.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json

``transformer/`` and ``vae/`` are not written here.
"""

from __future__ import annotations

import io
import json
import random
import tempfile
from pathlib import Path

import torch

CLIP_DIM = 32
T5_DIM = 32
T5_SPM_VOCAB = 300  # sentencepiece pieces; T5 adds 100 <extra_id_*> sentinels on top
CLIP_MERGES = [
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("s", "k"),
    ("sk", "y</w>"),
    ("o", "f</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("p", "a"),
    ("pa", "n"),
    ("o", "r"),
    ("a", "m"),
    ("s", "u"),
    ("su", "n</w>"),
]

MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "_diffusers_version": "0.30.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

_SYLLABLE_TEXT = (
    "ka lo mi ne ra su to vi pa qu ze xo bar den fel gor han jil "
    "mor ple sky moun tain sun set ocean wave city night light forest river cloud snow desert dome"
)
_FIXED_SENTENCES = [
    "a panoramic view of the mountains at sunset, 360 degrees, equirectangular projection",
    "an ancient city street at night with neon lights and rain",
    "Café über naïve façade — 東京 ¡hola! 123 456 7890",
]


def build_tiny_text_stack(root: Path, seed: int = 0) -> dict:
    """Write tiny CLIP-L / T5 stand-ins (models + tokenizers) in FLUX.1-dev's layout under ``root``.

    Returns the folder paths (``root``, ``text_encoder``, ``tokenizer``, ``text_encoder_2``,
    ``tokenizer_2``, ``scheduler``) and the dims (``t5_dim``, ``clip_dim``). Deterministic for a seed.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "root": root,
        "text_encoder": root / "text_encoder",
        "tokenizer": root / "tokenizer",
        "text_encoder_2": root / "text_encoder_2",
        "tokenizer_2": root / "tokenizer_2",
        "scheduler": root / "scheduler",
    }
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    paths["scheduler"].mkdir(exist_ok=True)
    (paths["scheduler"] / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))

    clip_vocab_size = _write_clip_tokenizer(paths["tokenizer"])
    t5_vocab_size = _write_t5_tokenizer(paths["tokenizer_2"], seed)
    _write_clip_model(paths["text_encoder"], clip_vocab_size, seed)
    _write_t5_model(paths["text_encoder_2"], t5_vocab_size, seed)
    return {**paths, "t5_dim": T5_DIM, "clip_dim": CLIP_DIM, "t5_vocab_size": t5_vocab_size}


# --- tokenizers -----------------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in GPT-2/CLIP order (printable bytes first)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def _write_clip_tokenizer(folder: Path) -> int:
    """CLIP byte-level BPE: 256 bytes, their ``</w>`` forms, a few merges, then bos and eos last."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    for a, b in CLIP_MERGES:
        vocab.setdefault(a + b, len(vocab))
    # As in CLIP-L, <|endoftext|> has the highest id: CLIPTextModel's legacy pooling (eos_token_id=2
    # in the config) takes the argmax of the input ids.
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)

    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(CLIP_MERGES), model_max_length=77)
    tok.save_pretrained(folder)
    # transformers 5 saves only tokenizer.json; FLUX.1-dev's tokenizer/ holds the slow files instead.
    (folder / "tokenizer.json").unlink(missing_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in CLIP_MERGES))
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    # The transformers 4.x style config that FLUX.1-dev ships (replaces the one save_pretrained wrote).
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(vocab["<|startoftext|>"]): _added_token("<|startoftext|>", normalized=True),
            str(vocab["<|endoftext|>"]): _added_token("<|endoftext|>", normalized=False),
        },
        **special,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


def _added_token(content: str, normalized: bool = False) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _training_text(seed: int) -> list[str]:
    rng = random.Random(seed)
    syllables = _SYLLABLE_TEXT.split()
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    words += ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    return lines + _FIXED_SENTENCES


def _write_t5_tokenizer(folder: Path, seed: int) -> int:
    """A unigram sentencepiece model (pad 0, eos 1, unk 2 as in T5) turned into a T5TokenizerFast."""
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text(seed)),
        model_writer=proto,
        vocab_size=T5_SPM_VOCAB,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    spiece = proto.getvalue()
    # transformers 5 ignores T5TokenizerFast(vocab_file=...); from_pretrained on a folder holding
    # only spiece.model converts it properly.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(spiece)
        tok = T5TokenizerFast.from_pretrained(tmp, model_max_length=512, extra_ids=100, local_files_only=True)
        tok.save_pretrained(folder)
    (folder / "spiece.model").write_bytes(spiece)
    extra = [f"<extra_id_{i}>" for i in range(100)]
    special = {
        "additional_special_tokens": extra,
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    # The transformers 4.x style config that FLUX.1-dev ships (replaces the one save_pretrained wrote).
    decoder = {str(i): _added_token(t) for i, t in enumerate(["<pad>", "</s>", "<unk>"])}
    decoder.update({str(tok.convert_tokens_to_ids(t)): _added_token(t) for t in extra})
    config = {
        "add_prefix_space": True,
        "added_tokens_decoder": decoder,
        **special,
        "clean_up_tokenization_spaces": True,
        "extra_ids": 100,
        "legacy": True,
        "model_max_length": 512,
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(tok)


# --- models ---------------------------------------------------------------------------------------


def _randomize(model: torch.nn.Module, seed: int, std_linear: float, std_embed: float) -> None:
    """Re-initialise every parameter from a seeded generator: norms near 1, the rest N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "norm" in name:  # LayerNorm bias
                p.copy_(0.1 * noise)
            elif "embed" in name or "shared" in name or "relative_attention_bias" in name:
                p.copy_(std_embed * noise)
            else:
                p.copy_(std_linear * noise)


def _write_clip_model(folder: Path, vocab_size: int, seed: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    # Token ids as in FLUX.1-dev's text_encoder/config.json (eos_token_id=2 selects legacy pooling).
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )
    model = CLIPTextModel(config).eval()
    _randomize(model, seed + 1, std_linear=0.15, std_embed=0.5)
    model.to(torch.bfloat16).save_pretrained(folder)


def _write_t5_model(folder: Path, vocab_size: int, seed: int) -> None:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=(vocab_size + 31) // 32 * 32,  # padded like FLUX's 32100-token tokenizer / 32128 rows
        d_model=T5_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    model = T5EncoderModel(config).eval()
    _randomize(model, seed + 2, std_linear=0.2, std_embed=0.5)
    model = model.to(torch.bfloat16)
    # About 70 kB in bf16: 40 kB shards give several files plus model.safetensors.index.json.
    model.save_pretrained(folder, max_shard_size="40KB")
    if not (folder / "model.safetensors.index.json").is_file():
        raise RuntimeError("the tiny T5 was not sharded; lower max_shard_size")
