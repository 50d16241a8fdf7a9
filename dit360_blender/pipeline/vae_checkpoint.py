"""Loading the FLUX VAE from the checkpoint layouts users have: BFL's ``ae.safetensors`` (also
inside an all-in-one file, under ``vae.`` or ``first_stage_model.``) or a diffusers ``vae/`` folder,
whose keys are converted to BFL's (``convert_diffusers_vae_to_bfl``).

The model is built on the meta device and the memory-mapped tensors are assigned into it, so the
weights never exist twice in RAM.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor

from .errors import BadCheckpointError, WeightsMissingError
from .safetensors_io import open_safetensors
from .vae_model import FLUX_DEV_AE, AutoEncoder, AutoEncoderParams

_EXPECTED_LAYOUT = (
    "a FLUX autoencoder: either BFL's ae.safetensors (keys like 'encoder.conv_in.weight', "
    "'decoder.up.0.block.0.conv1.weight', 'decoder.mid.attn_1.q.weight') or a diffusers vae/ folder "
    "(config.json + diffusion_pytorch_model.safetensors)"
)


# --------------------------------------------------------------------------------------------
# diffusers -> BFL key conversion
# --------------------------------------------------------------------------------------------

_ATTN_RENAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # names of diffusers' deprecated attention block, still found in old saved checkpoints
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_RE_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)$")
_RE_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)$")
_RE_MID_RESNET = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)$")
_RE_MID_ATTN = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$")


def _resnet_param(rest: str) -> str:
    return rest.replace("conv_shortcut.", "nin_shortcut.", 1) if rest.startswith("conv_shortcut.") else rest


def convert_diffusers_vae_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to BFL's ``ae.safetensors`` layout.

    diffusers numbers the decoder's ``up_blocks`` from the lowest resolution up, BFL's ``up``
    from the highest down, so the index is reversed; the mid attention's Linear weights become
    1x1 conv weights. Keys it does not recognise are passed through unchanged, so the loader
    can report them (e.g. ``quant_conv``, which the FLUX VAE does not have).
    """
    up_indices = [int(m.group(1)) for k in state_dict if (m := _RE_UP.match(k))]
    num_up = max(up_indices) + 1 if up_indices else 0

    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new_key = key
        if m := _RE_DOWN.match(key):
            level, kind, j, rest = m.groups()
            if kind == "resnets":
                new_key = f"encoder.down.{level}.block.{j}.{_resnet_param(rest)}"
            else:
                new_key = f"encoder.down.{level}.downsample.{rest}"
        elif m := _RE_UP.match(key):
            k, kind, j, rest = m.groups()
            level = num_up - 1 - int(k)
            if kind == "resnets":
                new_key = f"decoder.up.{level}.block.{j}.{_resnet_param(rest)}"
            else:
                new_key = f"decoder.up.{level}.upsample.{rest}"
        elif m := _RE_MID_RESNET.match(key):
            side, j, rest = m.groups()
            new_key = f"{side}.mid.block_{int(j) + 1}.{_resnet_param(rest)}"
        elif (m := _RE_MID_ATTN.match(key)) and m.group(2) in _ATTN_RENAMES:
            side, name, kind = m.groups()
            new_key = f"{side}.mid.attn_1.{_ATTN_RENAMES[name]}.{kind}"
            if kind == "weight" and name != "group_norm" and tensor.ndim == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)  # Linear (out, in) -> 1x1 conv
        elif key.startswith(("encoder.conv_norm_out.", "decoder.conv_norm_out.")):
            new_key = key.replace(".conv_norm_out.", ".norm_out.", 1)
        out[new_key] = tensor
    return out


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_BFL_PREFIXES = ("vae.", "first_stage_model.")
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _is_diffusers_layout(keys: list[str]) -> bool:
    return any(
        k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "decoder.mid_block.")) for k in keys
    )


def _read_vae_tensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], str]:
    """The VAE tensors of one or more safetensors files (memory-mapped), and the prefix stripped.

    In an all-in-one checkpoint (VAE under ``vae.`` or ``first_stage_model.``) only the VAE
    tensors are read, so the transformer and text encoders stored beside it cost nothing.
    """
    with ExitStack() as stack:
        handles = [stack.enter_context(open_safetensors(path)) for path in files]
        keys_per_file = [list(f.keys()) for f in handles]
        names = [key for keys in keys_per_file for key in keys]
        prefix = ""
        if not any(k.startswith(("encoder.", "decoder.")) for k in names):
            prefix = next((p for p in _BFL_PREFIXES if any(k.startswith(p + "encoder.") for k in names)), "")
        state: dict[str, torch.Tensor] = {}
        for f, keys in zip(handles, keys_per_file, strict=True):
            for key in keys:
                if key.startswith(prefix):
                    state[key[len(prefix) :]] = f.get_tensor(key)
    return state, prefix


def _params_from_diffusers_config(config_path: Path) -> AutoEncoderParams:
    """AutoEncoderParams from a diffusers ``AutoencoderKL`` config.json (checked for FLUX-compatibility)."""
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadCheckpointError(
            f"Cannot read the VAE config {config_path}: {exc}",
            "Download the vae/ folder again (config.json is damaged).",
        ) from exc

    problems = []
    if cfg.get("use_quant_conv", True) or cfg.get("use_post_quant_conv", True):
        problems.append("it uses quant_conv/post_quant_conv (an SD-style VAE)")
    if cfg.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn is {cfg.get('act_fn')!r}, not 'silu'")
    if not cfg.get("mid_block_add_attention", True):
        problems.append("its mid block has no attention")
    if any(t != "DownEncoderBlock2D" for t in cfg.get("down_block_types", [])) or any(
        t != "UpDecoderBlock2D" for t in cfg.get("up_block_types", [])
    ):
        problems.append("its block types are not DownEncoderBlock2D/UpDecoderBlock2D")
    block_out = list(cfg.get("block_out_channels", [128, 256, 512, 512]))
    ch = block_out[0]
    if any(c % ch for c in block_out):
        problems.append(f"block_out_channels {block_out} are not multiples of the first")
    if problems:
        raise BadCheckpointError(
            f"{config_path.parent} is not a FLUX-style autoencoder: " + "; ".join(problems) + ".",
            "Use the vae/ folder of black-forest-labs/FLUX.1-dev, or BFL's ae.safetensors. "
            f"Expected {_EXPECTED_LAYOUT}.",
        )
    shift = cfg.get("shift_factor")
    return AutoEncoderParams(
        resolution=int(cfg.get("sample_size", 256) or 256),
        in_channels=int(cfg.get("in_channels", 3)),
        ch=ch,
        out_ch=int(cfg.get("out_channels", 3)),
        ch_mult=tuple(c // ch for c in block_out),
        num_res_blocks=int(cfg.get("layers_per_block", 2)),
        z_channels=int(cfg.get("latent_channels", 16)),
        scale_factor=float(cfg.get("scaling_factor", FLUX_DEV_AE.scale_factor)),
        shift_factor=float(shift) if shift is not None else 0.0,
        norm_groups=int(cfg.get("norm_num_groups", 32)),
    )


def _diffusers_weight_files(folder: Path) -> list[Path]:
    single = folder / _DIFFUSERS_WEIGHTS
    if single.is_file():
        return [single]
    index = folder / (_DIFFUSERS_WEIGHTS + ".index.json")
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise BadCheckpointError(
                f"Cannot read the shard index {index}: {exc}", "Download the vae/ folder again."
            ) from exc
        return [folder / n for n in names]
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates
    raise WeightsMissingError(
        f"No {_DIFFUSERS_WEIGHTS} in {folder}"
        + (f" (found several candidates: {', '.join(c.name for c in candidates)})" if candidates else ""),
        "The vae/ folder must hold config.json and diffusion_pytorch_model.safetensors; download it again.",
    )


def _resolve_source(path: Path) -> tuple[list[Path], Path | None]:
    """(weight files, diffusers config.json or None) for a file, a vae/ folder or a model root."""
    if path.is_file():
        return [path], None
    if not path.exists():
        raise WeightsMissingError(
            f"VAE weights not found: {path}",
            "Point the add-on at BFL's ae.safetensors or at FLUX.1-dev's vae/ folder, "
            "or let it download the models (Preferences > Models).",
        )
    if (path / "ae.safetensors").is_file():
        return [path / "ae.safetensors"], None
    folder = path / "vae" if (path / "vae").is_dir() and not (path / "config.json").is_file() else path
    config = folder / "config.json"
    if not config.is_file():
        raise WeightsMissingError(
            f"{folder} has no config.json, so it is not a diffusers vae/ folder "
            "(and it holds no ae.safetensors).",
            "Point the add-on at BFL's ae.safetensors, or at a complete diffusers vae/ folder.",
        )
    return _diffusers_weight_files(folder), config


def _check_keys(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str, layout: str
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if not (missing or unexpected or wrong):
        return

    def few(items: list[str]) -> str:
        shown = ", ".join(items[:5])
        return shown + (f", ... ({len(items)} in all)" if len(items) > 5 else "")

    parts = []
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if wrong:
        parts.append(f"wrong shapes: {few(wrong)}")
    raise BadCheckpointError(
        f"{source} (read as {layout}) does not fit the FLUX autoencoder: " + "; ".join(parts) + ".",
        f"Expected {_EXPECTED_LAYOUT}. A FLUX transformer, a LoRA or an SD-style VAE will not work here.",
    )


def load_autoencoder(
    path: str | Path,
    params: AutoEncoderParams | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> AutoEncoder:
    """Load the FLUX VAE from ``ae.safetensors`` (BFL layout) or a diffusers ``vae/`` folder.

    The module is built on the meta device and the (memory-mapped) tensors are assigned into
    it, so the weights are never held twice in RAM. For a diffusers folder the shape comes from
    its config.json and ``params`` is ignored; for ``ae.safetensors`` the channel layout is read
    from the tensor shapes unless ``params`` is given (FLUX's scale/shift and 32 norm groups).
    """
    path = Path(path)
    files, config = _resolve_source(path)
    if config is not None:
        params = _params_from_diffusers_config(config)

    state, prefix = _read_vae_tensors(files)
    layout = "BFL ae.safetensors layout" + (f" with prefix '{prefix}'" if prefix else "")
    if config is not None or _is_diffusers_layout(list(state)):
        state = convert_diffusers_vae_to_bfl(state)
        layout = "diffusers AutoencoderKL layout"

    if params is None:
        params = infer_ae_params(state)
    with torch.device("meta"):
        model = AutoEncoder(params)
    _check_keys(state, model.state_dict(), str(path), layout)

    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def infer_ae_params(state: dict[str, Tensor]) -> AutoEncoderParams:
    """The channel layout of a BFL-keyed VAE state dict; scale, shift and groups are FLUX's."""
    try:
        ch, in_channels = state["encoder.conv_in.weight"].shape[:2]
        levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")})
        ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels)
        blocks = {int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block.")}
        return AutoEncoderParams(
            in_channels=in_channels,
            ch=ch,
            out_ch=state["decoder.conv_out.weight"].shape[0],
            ch_mult=ch_mult,
            num_res_blocks=len(blocks),
            z_channels=state["decoder.conv_in.weight"].shape[1],
        )
    except (KeyError, IndexError) as exc:
        raise BadCheckpointError(
            f"This file is not a FLUX VAE (no {exc}).",
            "Point the VAE setting at FLUX.1-dev's ae.safetensors or its diffusers vae/ folder.",
        ) from exc
