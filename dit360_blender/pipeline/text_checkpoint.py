"""FLUX's text encoders out of a ComfyUI all-in-one checkpoint.

Such a file keeps CLIP-L under ``text_encoders.clip_l.transformer.`` and the T5-XXL encoder under
``text_encoders.t5xxl.transformer.`` (older files: ``cond_stage_model.…``), in transformers' own
key names, but no config and no tokenizer: the tokenizers still come from FLUX.1-dev's
``tokenizer/`` and ``tokenizer_2/``, and the configs are read from the tensor shapes with the
hyperparameters that are no shape: those of FLUX.1-dev's ``text_encoder/config.json`` and
``text_encoder_2/config.json`` (CLIP's 64-wide heads, quick-GELU, its token ids; T5 v1.1's gated
GELU and relative-attention distance). transformers then loads the tensors as it loads a folder
(its fp32 ``wo`` in fp16, tied embeddings).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .errors import BadCheckpointError
from .safetensors_io import open_safetensors

_ROOTS = ("text_encoders.", "cond_stage_model.")
_PARTS = {"CLIPTextModel": "clip_l.transformer.", "T5EncoderModel": "t5xxl.transformer."}
_DROPPED = ("text_projection.weight", "logit_scale")  # CLIP's image-text head: no use for FLUX
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
CLIP_HEAD_DIM = 64  # every CLIP text tower (ViT-B/L/H/bigG) uses 64-wide heads


def load_from_checkpoint(model_cls, path: Path, dtype: torch.dtype):
    """CLIPTextModel or T5EncoderModel with the weights the all-in-one checkpoint ``path`` holds."""
    state = _read_part(Path(path), _PARTS[model_cls.__name__], dtype)
    config = _clip_config(state) if model_cls.__name__ == "CLIPTextModel" else _t5_config(state)
    from .text_encoders import _dtype_kwargs  # here: text_encoders imports this module

    model, info = model_cls.from_pretrained(
        None, config=config, state_dict=state, output_loading_info=True, **_dtype_kwargs(dtype)
    )
    broken = sorted(info["missing_keys"]) + sorted(map(str, info["mismatched_keys"]))
    if broken:
        raise BadCheckpointError(
            f"The {model_cls.__name__} in {path} is incomplete or of another shape: {broken[:5]}.",
            "Use FLUX.1-dev's text_encoder/ and text_encoder_2/ folders instead of this checkpoint's.",
        )
    return model.eval().requires_grad_(False)


def _read_part(path: Path, part: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors under ``<root><part>``, prefix removed; fp8 ones (times their scale) in ``dtype``."""
    with open_safetensors(path) as f:
        keys = list(f.keys())
        root = next((r for r in _ROOTS if any(k.startswith(r + part) for k in keys)), None)
        if root is None:
            raise BadCheckpointError(
                f"{path} holds no {part.split('.')[0]} text encoder.",
                "Use FLUX.1-dev's text_encoder/ and text_encoder_2/ folders.",
            )
        prefix = root + part
        state = {k[len(prefix) :]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
    out = {}
    for key, tensor in state.items():
        if key.endswith(("scale_weight", "scale_input")) or key in _DROPPED:
            continue
        if tensor.dtype in _FP8:  # fp8 all-in-one files (ComfyUI's flux1-dev-fp8)
            scale = state.get(key[: -len("weight")] + "scale_weight")
            tensor = tensor.to(dtype) * (scale.to(dtype) if scale is not None else 1)
        out[key] = tensor
    return out


def _count(state: dict[str, Tensor], prefix: str) -> int:
    ids = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def _clip_config(state: dict[str, Tensor]):
    from transformers import CLIPTextConfig

    # ComfyUI's files use transformers' classic names (`text_model.embeddings…`); transformers 5
    # saves them without `text_model.` and reads both
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    try:
        vocab, hidden = state["embeddings.token_embedding.weight"].shape
        positions = state["embeddings.position_embedding.weight"].shape[0]
        intermediate = state["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise BadCheckpointError(
            f"The CLIP text encoder in the checkpoint lacks {exc.args[0]}.", "Use FLUX.1-dev's text_encoder/."
        ) from exc
    if hidden % CLIP_HEAD_DIM:
        raise BadCheckpointError(
            f"The checkpoint's CLIP text encoder is {hidden} wide, not a multiple of CLIP's 64-wide heads.",
            "Use FLUX.1-dev's text_encoder/ folder.",
        )
    return CLIPTextConfig(  # the rest as in FLUX.1-dev's text_encoder/config.json
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=_count(state, "encoder.layers."),
        num_attention_heads=hidden // CLIP_HEAD_DIM,
        max_position_embeddings=positions,
        projection_dim=hidden,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,  # as FLUX.1-dev's config: transformers' legacy pooling at the highest id
    )


def _t5_config(state: dict[str, Tensor]):
    from transformers import T5Config

    block = "encoder.block.0.layer."
    try:
        vocab, d_model = state["shared.weight"].shape
        buckets, heads = state[f"{block}0.SelfAttention.relative_attention_bias.weight"].shape
        inner = state[f"{block}0.SelfAttention.q.weight"].shape[0]
        gated = f"{block}1.DenseReluDense.wi_0.weight" in state
        d_ff = state[
            f"{block}1.DenseReluDense.wi_0.weight" if gated else f"{block}1.DenseReluDense.wi.weight"
        ]
    except KeyError as exc:
        raise BadCheckpointError(
            f"The T5 encoder in the checkpoint lacks {exc.args[0]}.", "Use FLUX.1-dev's text_encoder_2/."
        ) from exc
    return T5Config(  # the rest as in FLUX.1-dev's text_encoder_2/config.json (T5 v1.1 XXL)
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff.shape[0],
        num_layers=_count(state, "encoder.block."),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu",
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
