"""Loading the FLUX transformer from the checkpoint layouts users actually have.

* BFL single file (`flux1-dev.safetensors`), keys as in our model, optionally prefixed with
  `model.diffusion_model.` (all-in-one files);
* a diffusers `transformer/` folder (split q/k/v, fused here on load) or a diffusers-keyed file;
* fp8 e4m3fn files (Kijai-style unscaled, or ComfyUI-style with `.scale_weight` per tensor):
  the Linear weights stay fp8 in memory and are upcast per layer in forward;
* GGUF files (city96's quantised FLUX, `gguf_checkpoint.py`): the blocks stay quantised and are
  dequantised per layer in forward.

Tensors are read one at a time from memory-mapped files, transformed (LoRA merge in fp32, cast,
move to the device) and assigned into a model built on the meta device, so the model never
exists twice in RAM.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from .errors import BadCheckpointError, WeightsMissingError
from .flux_model import FLUX_DEV, Flux, FluxParams
from .fp8 import Fp8Linear, quantize_rowwise
from .gguf_checkpoint import GGUFWeight, is_gguf, iter_gguf, read_gguf, use_gguf_linears
from .safetensors_io import open_safetensors, safetensors_files_in

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
QUANTIZABLE = ("double_blocks.", "single_blocks.")  # embedders and the final layer stay in dtype

# ---------------------------------------------------------------------------------------------
# The BFL <-> diffusers key map. Each BFL Linear is made of one or more diffusers Linears stacked
# along the output rows; a part's size is "h" (hidden), "mlp" (MLP hidden) or None (the whole).


def linear_map(depth: int, depth_single: int) -> dict[str, list[tuple[str, str | None]]]:
    """BFL Linear stem -> the diffusers Linear stems stacked (in row order) to form it."""
    m: dict[str, list[tuple[str, str | None]]] = {
        "img_in": [("x_embedder", None)],
        "txt_in": [("context_embedder", None)],
        "time_in.in_layer": [("time_text_embed.timestep_embedder.linear_1", None)],
        "time_in.out_layer": [("time_text_embed.timestep_embedder.linear_2", None)],
        "guidance_in.in_layer": [("time_text_embed.guidance_embedder.linear_1", None)],
        "guidance_in.out_layer": [("time_text_embed.guidance_embedder.linear_2", None)],
        "vector_in.in_layer": [("time_text_embed.text_embedder.linear_1", None)],
        "vector_in.out_layer": [("time_text_embed.text_embedder.linear_2", None)],
        "final_layer.linear": [("proj_out", None)],
    }
    for i in range(depth):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        m[f"{b}.img_mod.lin"] = [(f"{d}.norm1.linear", None)]
        m[f"{b}.txt_mod.lin"] = [(f"{d}.norm1_context.linear", None)]
        m[f"{b}.img_attn.qkv"] = [(f"{d}.attn.to_{x}", "h") for x in "qkv"]
        m[f"{b}.txt_attn.qkv"] = [(f"{d}.attn.add_{x}_proj", "h") for x in "qkv"]
        m[f"{b}.img_attn.proj"] = [(f"{d}.attn.to_out.0", None)]
        m[f"{b}.txt_attn.proj"] = [(f"{d}.attn.to_add_out", None)]
        m[f"{b}.img_mlp.0"] = [(f"{d}.ff.net.0.proj", None)]
        m[f"{b}.img_mlp.2"] = [(f"{d}.ff.net.2", None)]
        m[f"{b}.txt_mlp.0"] = [(f"{d}.ff_context.net.0.proj", None)]
        m[f"{b}.txt_mlp.2"] = [(f"{d}.ff_context.net.2", None)]
    for i in range(depth_single):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        m[f"{b}.linear1"] = [(f"{d}.attn.to_{x}", "h") for x in "qkv"] + [(f"{d}.proj_mlp", "mlp")]
        m[f"{b}.linear2"] = [(f"{d}.proj_out", None)]
        m[f"{b}.modulation.lin"] = [(f"{d}.norm.linear", None)]
    return m


def norm_map(depth: int, depth_single: int) -> dict[str, str]:
    """BFL RMSNorm `scale` keys -> diffusers `weight` keys."""
    m = {}
    for i in range(depth):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for stream, (q, k) in (("img", ("norm_q", "norm_k")), ("txt", ("norm_added_q", "norm_added_k"))):
            m[f"{b}.{stream}_attn.norm.query_norm.scale"] = f"{d}.attn.{q}.weight"
            m[f"{b}.{stream}_attn.norm.key_norm.scale"] = f"{d}.attn.{k}.weight"
    for i in range(depth_single):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        m[f"{b}.norm.query_norm.scale"] = f"{d}.attn.norm_q.weight"
        m[f"{b}.norm.key_norm.scale"] = f"{d}.attn.norm_k.weight"
    return m


# BFL keeps (shift, scale) in the final adaLN; diffusers keeps (scale, shift).
FINAL_ADALN_BFL = "final_layer.adaLN_modulation.1"
FINAL_ADALN_DIFFUSERS = "norm_out.linear"


def _count_blocks(keys: list[str], prefix: str) -> int:
    ids = {int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def is_diffusers_layout(keys: list[str]) -> bool:
    return any(k.startswith(("transformer_blocks.", "x_embedder.")) for k in keys)


def diffusers_stem_to_bfl(params: FluxParams) -> dict[str, tuple[str, int, int]]:
    """diffusers Linear stem -> (BFL stem, first row, number of rows) inside the fused weight."""
    sizes = {"h": params.hidden_size, "mlp": int(params.hidden_size * params.mlp_ratio)}
    out = {}
    for bfl, parts in linear_map(params.depth, params.depth_single_blocks).items():
        row = 0
        for stem, size in parts:
            n = sizes[size] if size else -1
            out[stem] = (bfl, row, n)
            row += max(n, 0)
    return out


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def convert_bfl_to_diffusers(state: dict[str, Tensor], params: FluxParams) -> dict[str, Tensor]:
    """The inverse of loading a diffusers checkpoint: split the fused rows back apart."""
    out: dict[str, Tensor] = {}
    for stem, (bfl, row, n) in diffusers_stem_to_bfl(params).items():
        for suffix in ("weight", "bias"):
            key = f"{bfl}.{suffix}"
            if key in state:
                t = state[key]
                out[f"{stem}.{suffix}"] = t if n < 0 else t[row : row + n].clone()
    for bfl, diff in norm_map(params.depth, params.depth_single_blocks).items():
        out[diff] = state[bfl]
    for suffix in ("weight", "bias"):
        out[f"{FINAL_ADALN_DIFFUSERS}.{suffix}"] = _swap_halves(state[f"{FINAL_ADALN_BFL}.{suffix}"])
    return out


# ---------------------------------------------------------------------------------------------
# Reading tensors in BFL keys, one at a time


SCALED_FP8_MARKER = "scaled_fp8"  # an empty tensor ComfyUI's scaled-fp8 files carry, not a weight


def bfl_keys(keys: list[str]) -> dict[str, str]:
    """File key -> BFL key for a BFL-layout file, leaving out what is not the transformer's.

    With a `model.diffusion_model.` prefix (ComfyUI all-in-one files) only the prefixed keys are the
    transformer; the VAE (`vae.`) and text encoders (`text_encoders.`) beside them are not.
    """
    prefix = next((p for p in BFL_PREFIXES if any(k.startswith(p) for k in keys)), "")
    return {
        k: k[len(prefix) :] for k in keys if k.startswith(prefix) and k[len(prefix) :] != SCALED_FP8_MARKER
    }


def _transformer_files(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        return safetensors_files_in(path)
    if not path.exists():
        raise WeightsMissingError(
            f"FLUX transformer weights not found: {path}",
            "Give the path of flux1-dev.safetensors (or a diffusers transformer/ folder), "
            "or download the models (Preferences > Models, or `generate --download`).",
        )
    return [path]


def iter_bfl_tensors(path: Path) -> Iterator[tuple[str, Tensor | GGUFWeight]]:
    """(BFL key, tensor) pairs from any supported layout; each tensor is read when yielded.

    A GGUF file's quantised weights come as `GGUFWeight` (their blocks, not dequantised)."""
    if is_gguf(path):
        entries = read_gguf(path)
        yield from iter_gguf(entries, bfl_keys(list(entries)))
        return
    with ExitStack() as stack:
        handles = [stack.enter_context(open_safetensors(f)) for f in _transformer_files(path)]
        where = {k: h for h in handles for k in h.keys()}
        if not is_diffusers_layout(list(where)):
            for key, bfl in sorted(bfl_keys(list(where)).items()):  # ".scale_weight" sorts before ".weight"
                yield bfl, where[key].get_tensor(key)
            return
        yield from _iter_diffusers_as_bfl(where)


def _iter_diffusers_as_bfl(where: dict) -> Iterator[tuple[str, Tensor]]:
    keys = list(where)
    depth = _count_blocks(keys, "transformer_blocks.")
    depth_single = _count_blocks(keys, "single_transformer_blocks.")
    used: set[str] = set()

    def read(key: str) -> Tensor:
        used.add(key)
        return where[key].get_tensor(key)

    for bfl, parts in linear_map(depth, depth_single).items():
        for suffix in ("weight", "bias"):
            names = [f"{stem}.{suffix}" for stem, _ in parts]
            present = [n for n in names if n in where]
            if not present:
                continue
            if len(present) != len(names):
                missing = sorted(set(names) - set(present))
                raise BadCheckpointError(
                    f"The diffusers transformer checkpoint lacks {missing}.",
                    "The file is incomplete or not a FLUX transformer: download it again.",
                )
            yield f"{bfl}.{suffix}", torch.cat([read(n) for n in names], dim=0)
    for bfl, diff in norm_map(depth, depth_single).items():
        if diff in where:
            yield bfl, read(diff)
    for suffix in ("weight", "bias"):
        key = f"{FINAL_ADALN_DIFFUSERS}.{suffix}"
        if key in where:
            yield f"{FINAL_ADALN_BFL}.{suffix}", _swap_halves(read(key))
    unexpected = sorted(set(keys) - used)
    if unexpected:
        raise BadCheckpointError(
            f"The diffusers transformer checkpoint has {len(unexpected)} keys that FLUX.1 does not use, "
            f"e.g. {unexpected[:5]}.",
            "Use a FLUX.1-dev transformer checkpoint (not a ControlNet, IP-Adapter or other model).",
        )


# ---------------------------------------------------------------------------------------------
# Reading the config from the checkpoint itself


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of all tensors in BFL keys, without reading any tensor data."""
    if is_gguf(path):
        entries = read_gguf(path)
        return {bfl: entries[k].shape for k, bfl in bfl_keys(list(entries)).items()}
    with ExitStack() as stack:
        handles = [stack.enter_context(open_safetensors(f)) for f in _transformer_files(path)]
        shapes = {k: tuple(h.get_slice(k).get_shape()) for h in handles for k in h.keys()}
    if not is_diffusers_layout(list(shapes)):
        return {bfl: shapes[k] for k, bfl in bfl_keys(list(shapes)).items()}
    depth = _count_blocks(list(shapes), "transformer_blocks.")
    depth_single = _count_blocks(list(shapes), "single_transformer_blocks.")
    out: dict[str, tuple[int, ...]] = {}
    for bfl, parts in linear_map(depth, depth_single).items():
        for suffix in ("weight", "bias"):
            names = [f"{stem}.{suffix}" for stem, _ in parts]
            if all(n in shapes for n in names):
                rows = sum(shapes[n][0] for n in names)
                out[f"{bfl}.{suffix}"] = (rows, *shapes[names[0]][1:])
    for bfl, diff in norm_map(depth, depth_single).items():
        if diff in shapes:
            out[bfl] = shapes[diff]
    for suffix in ("weight", "bias"):
        if f"{FINAL_ADALN_DIFFUSERS}.{suffix}" in shapes:
            out[f"{FINAL_ADALN_BFL}.{suffix}"] = shapes[f"{FINAL_ADALN_DIFFUSERS}.{suffix}"]
    return out


def infer_params(shapes: dict[str, tuple[int, ...]], axes_dim: list[int] | None = None) -> FluxParams:
    """FluxParams from tensor shapes; RoPE axes default to FLUX's [16, 56, 56] for head dim 128."""
    try:
        hidden, in_channels = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        keys = list(shapes)
        params = dict(
            in_channels=in_channels,
            out_channels=shapes["final_layer.linear.weight"][0],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden,
            mlp_ratio=shapes["double_blocks.0.img_mlp.0.weight"][0] / hidden,
            num_heads=hidden // head_dim,
            depth=_count_blocks(keys, "double_blocks."),
            depth_single_blocks=_count_blocks(keys, "single_blocks."),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except KeyError as exc:
        raise BadCheckpointError(
            f"This checkpoint is not a FLUX.1 transformer (it has no {exc.args[0]!r}).",
            "Point the transformer setting at flux1-dev.safetensors or a FLUX.1-dev transformer/ folder.",
        ) from exc
    if axes_dim is None:
        if head_dim != sum(FLUX_DEV.axes_dim):
            raise BadCheckpointError(
                f"Head dim {head_dim} differs from FLUX.1's 128, so the RoPE axes can't be assumed.",
                "Use the model's diffusers transformer/ folder (its config.json states axes_dims_rope), "
                "or pass axes_dim explicitly.",
            )
        axes_dim = list(FLUX_DEV.axes_dim)
    try:
        return FluxParams(axes_dim=list(axes_dim), **params)
    except ValueError as exc:  # RoPE axes that don't add up to the head dim
        raise BadCheckpointError(str(exc), "Give RoPE axes that add up to the head dim.") from exc


def config_axes_dim(path: Path) -> list[int] | None:
    """The RoPE axes (`axes_dims_rope`) in the config.json of the diffusers transformer folder
    `path` (or of the folder holding its `diffusion_pytorch_model*` file), or None."""
    path = Path(path)
    if not path.is_dir() and not path.name.startswith("diffusion_pytorch_model"):
        return None  # a single file: a config.json beside it belongs to something else
    config_path = (path if path.is_dir() else path.parent) / "config.json"
    if not config_path.is_file():
        return None
    try:
        axes = json.loads(config_path.read_text(encoding="utf-8")).get("axes_dims_rope")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise BadCheckpointError(
            f"{config_path} is not a readable JSON config ({exc}).", "Download the transformer folder again."
        ) from exc
    if axes is None:
        return None
    if not isinstance(axes, list) or not all(isinstance(a, int) and a > 0 for a in axes):
        raise BadCheckpointError(
            f"{config_path} states axes_dims_rope {axes!r}, not a list of positive whole numbers.",
            "Download the transformer folder again.",
        )
    return axes


# ---------------------------------------------------------------------------------------------
# The loader


class WeightUpdate(Protocol):
    """What the loader needs from a LoRA (see `lora.LoraMerger`)."""

    def __call__(self, key: str, weight: Tensor) -> Tensor:
        """The fp32 weight of `key` with the update merged in (the same tensor when untouched)."""

    def attach(self, linear: nn.Module, key: str, dtype: torch.dtype) -> None:
        """Add the update of `key` beside a Linear whose weight stays quantised (no-op when untouched)."""


def load_flux_transformer(
    path: Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    axes_dim: list[int] | None = None,
    merge: WeightUpdate | None = None,
    quantize_fp8: bool = False,
    work_device: str | torch.device | None = None,
) -> Flux:
    """Build the transformer from any supported checkpoint.

    `merge` updates every weight in fp32 before it is cast, which is where the LoRAs are merged
    (before any rounding to bf16/fp16/fp8). Weights the file stores quantised (fp8 files, GGUF
    blocks) stay as stored and get the update as a low-rank side path in `dtype` instead: merging
    and quantising again would add a second rounding error (docs/benchmarks.md measures both).
    `quantize_fp8` stores the blocks' Linear weights in fp8 with per-row scales, quantised from
    the merged fp32 weight one tensor at a time (so the full bf16 model never exists on the GPU).
    `work_device` (default: `device`) is where the merge and the quantisation run, e.g. the GPU
    while the weights end up in host memory for streaming.
    """
    work_device = work_device or device
    shapes = read_shapes(path)
    params = infer_params(shapes, axes_dim or config_axes_dim(path))
    with torch.device("meta"):
        model = Flux(params)
    weight_keys = {k for k in shapes if not k.endswith((".scale_weight", ".scale_input"))}
    _check_keys(set(model.state_dict()), weight_keys, path)
    state: dict[str, Tensor] = {}
    fp8_keys: set[str] = set()
    gguf_types: dict[str, int] = {}
    stored_quantised: set[str] = set()  # as the file has them: the LoRA goes beside, not into them
    scales: dict[str, Tensor] = {}
    for key, tensor in iter_bfl_tensors(path):
        if isinstance(tensor, GGUFWeight):
            gguf_types[key] = tensor.qtype
            stored_quantised.add(key)
            state[key] = tensor.data.to(device)
            continue
        if key.endswith(".scale_weight"):  # per-tensor scales of scaled-fp8 files
            scales[key] = tensor.float().reshape(())
            continue
        if key.endswith(".scale_input"):  # activation scales of scaled-fp8 files: unused when upcasting
            continue
        if tensor.dtype in FP8_DTYPES and tensor.ndim == 2:
            fp8_keys.add(key)
            stored_quantised.add(key)
            state[key] = tensor.to(device)
            continue
        quantize = (
            quantize_fp8 and tensor.ndim == 2 and key.startswith(QUANTIZABLE) and key.endswith(".weight")
        )
        state[key] = _prepare(key, tensor, dtype, device, work_device, merge, scales, fp8_keys, quantize)
    _use_fp8_linears(model, fp8_keys)
    use_gguf_linears(model, gguf_types)
    for key in fp8_keys:
        scale_key = key[: -len("weight")] + "scale_weight"
        rows = state[key].shape[0]
        state[scale_key] = (
            scales.get(scale_key, torch.ones(())).to(device, torch.float32).expand(rows, 1).contiguous()
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise BadCheckpointError(
            f"{path} has tensors of the wrong shape for a FLUX.1 transformer: {exc}",
            "The file is damaged or mixes models: download flux1-dev.safetensors again.",
        ) from exc
    if merge is not None:
        for key in sorted(stored_quantised):
            merge.attach(model.get_submodule(key.rsplit(".", 1)[0]), key, dtype)
    return model.eval().requires_grad_(False)


def _use_fp8_linears(model: Flux, fp8_keys: set[str]) -> None:
    for key in fp8_keys:
        module_name = key.rsplit(".", 1)[0]
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear):
            continue
        with torch.device("meta"):
            setattr(parent, child, Fp8Linear(old.in_features, old.out_features, old.bias is not None))


def _prepare(
    key: str,
    tensor: Tensor,
    dtype: torch.dtype,
    device: str | torch.device,
    work_device: str | torch.device,
    merge: WeightUpdate | None,
    scales: dict[str, Tensor],
    fp8_keys: set[str],
    quantize: bool,
) -> Tensor:
    if merge is not None:
        tensor = merge(key, tensor.to(work_device).float())
    if not quantize:
        return tensor.to(device=device, dtype=dtype)
    q, scale = quantize_rowwise(tensor.to(work_device))
    fp8_keys.add(key)
    scales[key[: -len("weight")] + "scale_weight"] = scale.to(device)
    return q.to(device)


def _check_keys(expected: set[str], found: set[str], path: Path) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise BadCheckpointError(
            f"{path} does not match the FLUX.1 transformer: {len(missing)} missing keys "
            f"(e.g. {missing[:4]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:4]}).",
            "Use flux1-dev.safetensors, a FLUX.1-dev fp8 file or the diffusers transformer/ folder.",
        )
