"""FLUX.1-dev text conditioning: T5-XXL hidden states and the pooled CLIP-L vector.

Loaded through transformers from the FLUX.1-dev repository folders ``text_encoder/``
(CLIPTextModel), ``tokenizer/`` (CLIPTokenizer), ``text_encoder_2/`` (T5EncoderModel, sharded) and
``tokenizer_2/`` (T5TokenizerFast). :meth:`TextEncoders.encode` does exactly what diffusers'
``FluxPipeline.encode_prompt`` (and BFL's ``HFEmbedder``) does:

* T5: pad to ``max_length`` (512 for dev), truncate, run WITHOUT an attention mask (pad tokens
  attend and are attended), take ``last_hidden_state``;
* CLIP: pad to 77, truncate, take ``pooler_output`` (EOS token after the final LayerNorm, no
  projection).

Nothing here touches the network: downloading is another module's job.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

import torch

from .errors import BadCheckpointError, BadParametersError, DeviceError, DiT360Error, WeightsMissingError
from .safetensors_io import check_safetensors_file, safetensors_files_in
from .text_checkpoint import load_from_checkpoint

logger = logging.getLogger(__name__)

T5_MAX_LENGTH = 512  # FLUX.1-dev (schnell uses 256); diffusers refuses more than 512
CLIP_MAX_LENGTH = 77
REPO = "FLUX.1-dev"
_DOWNLOAD_HINT = "let the add-on download FLUX.1-dev (Preferences > Models), or fix the path"


class TextEncoders:
    """CLIP-L + T5-XXL with their tokenizers; call :meth:`encode` to get FLUX's conditioning."""

    def __init__(self, clip, clip_tokenizer, t5, t5_tokenizer, dtype: torch.dtype) -> None:
        self.clip = clip
        self.clip_tokenizer = clip_tokenizer
        self.t5 = t5
        self.t5_tokenizer = t5_tokenizer
        self.dtype = dtype

    # --- loading ----------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        clip_dir: Path | str,
        clip_tokenizer_dir: Path | str,
        t5_dir: Path | str,
        t5_tokenizer_dir: Path | str,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> TextEncoders:
        """Load the four FLUX.1-dev folders from disk (never from the network).

        Raises WeightsMissingError for a missing folder or file, BadCheckpointError for a damaged or
        foreign one, DeviceError if ``device`` cannot be used.
        """
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        device = _check_device(device)
        clip_tokenizer = _load_tokenizer(
            CLIPTokenizer,
            Path(clip_tokenizer_dir),
            "tokenizer",
            [("vocab.json", "merges.txt"), ("tokenizer.json",)],
        )
        t5_tokenizer = _load_tokenizer(
            T5TokenizerFast,
            Path(t5_tokenizer_dir),
            "tokenizer_2",
            [("tokenizer.json",), ("spiece.model",)],
        )
        clip = _load_model(CLIPTextModel, Path(clip_dir), "text_encoder", ("clip_text_model", "clip"), dtype)
        t5 = _load_model(T5EncoderModel, Path(t5_dir), "text_encoder_2", ("t5",), dtype)
        _check_vocab(clip_tokenizer, clip, Path(clip_tokenizer_dir), "tokenizer", "text_encoder")
        _check_vocab(t5_tokenizer, t5, Path(t5_tokenizer_dir), "tokenizer_2", "text_encoder_2")
        encoders = cls(clip, clip_tokenizer, t5, t5_tokenizer, dtype)
        return encoders.to(device)

    @classmethod
    def load_from_repo(
        cls, root: Path | str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
    ) -> TextEncoders:
        """Load from a FLUX.1-dev repository folder (``text_encoder/``, ``tokenizer/``, ...)."""
        root = Path(root)
        return cls.load(
            root / "text_encoder",
            root / "tokenizer",
            root / "text_encoder_2",
            root / "tokenizer_2",
            dtype=dtype,
            device=device,
        )

    # --- properties / memory ----------------------------------------------------------------------

    @property
    def t5_dim(self) -> int:
        """Width of the T5 hidden states (4096 for T5-XXL)."""
        self._require_loaded()
        return int(self.t5.config.d_model)

    @property
    def clip_dim(self) -> int:
        """Width of the pooled CLIP vector (768 for CLIP-L)."""
        self._require_loaded()
        return int(self.clip.config.hidden_size)

    @property
    def device(self) -> torch.device:
        """Device the encoders run on."""
        self._require_loaded()
        return next(self.t5.parameters()).device

    @property
    def loaded(self) -> bool:
        """False after :meth:`unload`."""
        return self.t5 is not None and self.clip is not None

    def to(self, device: str | torch.device) -> TextEncoders:
        """Move both models to ``device`` (e.g. to offload them to the CPU after encoding)."""
        self._require_loaded()
        device = _check_device(device)
        self.clip.to(device)
        self.t5.to(device)
        return self

    def unload(self) -> None:
        """Drop both models and tokenizers and give their memory back."""
        on_cuda = self.loaded and self.device.type == "cuda"
        self.clip = self.t5 = self.clip_tokenizer = self.t5_tokenizer = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    # --- encoding ---------------------------------------------------------------------------------

    def encode(self, prompt: str, max_length: int = T5_MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(t5_hidden (1, max_length, t5_dim), clip_pooled (1, clip_dim))`` for one prompt.

        Same as diffusers ``FluxPipeline.encode_prompt(prompt, max_sequence_length=max_length)``.
        A prompt longer than the tokenizers accept is truncated and a warning is logged.
        """
        self._require_loaded()
        if not isinstance(prompt, str):
            raise BadParametersError(
                f"The prompt must be text, got {type(prompt).__name__}.", "Pass the prompt as a string."
            )
        if not 1 <= int(max_length) <= T5_MAX_LENGTH:
            raise BadParametersError(
                f"max_length={max_length} is outside 1..{T5_MAX_LENGTH} (T5 tokens).",
                f"Use {T5_MAX_LENGTH}, the length FLUX.1-dev was trained with.",
            )
        max_length = int(max_length)
        clip_len = min(self.clip_tokenizer.model_max_length, CLIP_MAX_LENGTH)  # diffusers: model_max_length
        device = self.device

        t5_ids = self._tokenize(self.t5_tokenizer, prompt, max_length, "T5")
        clip_ids = self._tokenize(self.clip_tokenizer, prompt, clip_len, "CLIP")
        with torch.inference_mode():
            t5_hidden = self.t5(t5_ids.to(device), output_hidden_states=False).last_hidden_state
            clip_pooled = self.clip(clip_ids.to(device), output_hidden_states=False).pooler_output
        return t5_hidden.to(self.dtype), clip_pooled.to(self.dtype)

    def count_tokens(self, prompt: str) -> tuple[int, int]:
        """``(t5_tokens, clip_tokens)`` of a prompt, special tokens included, before truncation."""
        self._require_loaded()
        return (
            len(self.t5_tokenizer(prompt, verbose=False)["input_ids"]),
            len(self.clip_tokenizer(prompt, verbose=False)["input_ids"]),
        )

    @staticmethod
    def _tokenize(tokenizer, prompt: str, max_length: int, name: str) -> torch.Tensor:
        ids = tokenizer(
            [prompt],
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_overflowing_tokens=False,
            return_length=False,
            return_tensors="pt",
        ).input_ids
        full = tokenizer(prompt, verbose=False)["input_ids"]
        if len(full) > max_length:
            # Truncation keeps the final special token (EOS): what is lost is full[max_length-1:-1].
            dropped = tokenizer.decode(full[max_length - 1 : -1], skip_special_tokens=True)
            dropped = dropped if len(dropped) <= 200 else dropped[:200] + "..."
            logger.warning(
                "The prompt is %d %s tokens long; only %d are used. Dropped: %r",
                len(full),
                name,
                max_length,
                dropped,
            )
        return ids

    def _require_loaded(self) -> None:
        if not self.loaded:
            raise DiT360Error(
                "The text encoders were unloaded.", "Load them again with TextEncoders.load(...)."
            )


# --- helpers ----------------------------------------------------------------------------------------


def _check_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"Unknown device {device!r}: {exc}", "Use 'cpu', 'cuda' or 'cuda:N'.") from exc
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(
            "Device mps was requested but Metal (MPS) is not available in this Python.",
            "Use a PyTorch build with MPS on Apple Silicon, or choose the CPU.",
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"Device {device} was requested but CUDA is not available in this Python.",
            "Install a CUDA build of PyTorch, or choose the CPU.",
        )
    return device


def _require_folder(folder: Path, repo_folder: str, what: str) -> None:
    if not folder.is_dir():
        raise WeightsMissingError(
            f"{what} folder not found: {folder} (expected {REPO}'s `{repo_folder}/` folder here).",
            f"Point the add-on at the {REPO} folder that holds `{repo_folder}/`, or {_DOWNLOAD_HINT}.",
        )


def _load_tokenizer(tokenizer_cls, folder: Path, repo_folder: str, alternatives: list[tuple[str, ...]]):
    """Load a tokenizer folder; ``alternatives`` lists file sets of which one must be complete."""
    _require_folder(folder, repo_folder, "Tokenizer")
    if not any(all((folder / name).is_file() for name in files) for files in alternatives):
        wanted = " or ".join(" + ".join(files) for files in alternatives)
        raise WeightsMissingError(
            f"The tokenizer folder {folder} is incomplete: it needs {wanted} "
            f"(the files of {REPO}'s `{repo_folder}/`).",
            f"Download {REPO}'s `{repo_folder}/` again ({_DOWNLOAD_HINT}).",
        )
    try:
        return tokenizer_cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # tokenizers/json/sentencepiece raise many unrelated types
        raise BadCheckpointError(
            f"Cannot read the tokenizer in {folder} ({type(exc).__name__}: {exc}).",
            f"Its files are damaged or not {REPO}'s `{repo_folder}/`: download that folder again.",
        ) from exc


def _load_model(model_cls, folder: Path, repo_folder: str, model_types: tuple[str, ...], dtype: torch.dtype):
    """Check config + weights ourselves (clear errors), then let transformers load them once."""
    if folder.is_file():  # a ComfyUI all-in-one checkpoint holding this encoder
        return load_from_checkpoint(model_cls, folder, dtype)
    _require_folder(folder, repo_folder, "Text encoder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsMissingError(
            f"{config_path} is missing (part of {REPO}'s `{repo_folder}/`).",
            f"Download {REPO}'s `{repo_folder}/` again ({_DOWNLOAD_HINT}).",
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadCheckpointError(
            f"{config_path} is not valid JSON ({exc}).", f"Download {REPO}'s `{repo_folder}/` again."
        ) from exc
    if config.get("model_type") not in model_types:
        raise BadCheckpointError(
            f"{folder} holds a {config.get('model_type')!r} model, not {model_cls.__name__} "
            f"({REPO}'s `{repo_folder}/`).",
            f"Point the add-on at {REPO}'s `{repo_folder}/` folder (the two text encoders may be swapped).",
        )

    files = safetensors_files_in(folder)
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            shards = sorted(set(json.loads(index_path.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise BadCheckpointError(
                f"{index_path} is damaged ({exc}).", f"Download {REPO}'s `{repo_folder}/` again."
            ) from exc
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise WeightsMissingError(
                f"{folder} lacks weight shard(s) {', '.join(missing)} listed in {index_path.name}.",
                f"The download of {REPO}'s `{repo_folder}/` is incomplete: download it again.",
            )
        files = [folder / name for name in shards]
    for path in files:
        check_safetensors_file(path)

    try:
        model = model_cls.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, **_dtype_kwargs(dtype)
        )
    except Exception as exc:  # wrong shapes, unreadable tensors, ...
        raise BadCheckpointError(
            f"transformers could not load {model_cls.__name__} from {folder} ({type(exc).__name__}: {exc}).",
            f"The folder must be {REPO}'s `{repo_folder}/` as downloaded: download it again.",
        ) from exc
    return model.eval().requires_grad_(False)


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """``from_pretrained`` arguments that load straight into ``dtype`` without a second copy.

    transformers >= 4.56 calls the argument ``dtype`` and (from 5.0) always builds the model on the
    meta device, ignoring ``low_cpu_mem_usage``; older versions need ``torch_dtype`` + the flag.
    """
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    if (major, minor) >= (4, 56):
        return {"dtype": dtype} if major >= 5 else {"dtype": dtype, "low_cpu_mem_usage": True}
    return {"torch_dtype": dtype, "low_cpu_mem_usage": True}


def _check_vocab(tokenizer, model, tokenizer_dir: Path, tok_folder: str, model_folder: str) -> None:
    """A tokenizer whose ids exceed the embedding table would crash deep inside the model."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise BadCheckpointError(
            f"The tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model in "
            f"`{model_folder}/` only {rows} embeddings: they do not belong together.",
            f"Use {REPO}'s `{tok_folder}/` together with its `{model_folder}/`.",
        )
