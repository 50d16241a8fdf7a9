"""Tiny random-weight super-resolution networks built with spandrel's own architectures, saved in the
files users have (.pth state dicts, .safetensors), for the spandrel checks (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact
from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet
from spandrel.architectures.SwinIR.__arch.SwinIR import SwinIR


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "esrgan_x4":  # ESRGAN / Real-ESRGAN x4plus's layout, 1 RRDB block of 8 filters
        return RRDBNet(num_filters=8, num_blocks=1, scale=4)
    if name == "esrgan_x2":
        return RRDBNet(num_filters=8, num_blocks=1, scale=2)
    if name == "compact_x4":  # Real-ESRGAN's SRVGGNetCompact (realesr-general-x4v3's family)
        return SRVGGNetCompact(num_feat=8, num_conv=3, upscale=4)
    if name == "compact_x3":
        return SRVGGNetCompact(num_feat=8, num_conv=2, upscale=3)
    if name == "swinir_x2":
        return SwinIR(
            img_size=16, embed_dim=12, depths=[2], num_heads=[2], window_size=4, upscale=2,
            upsampler="pixelshuffle", in_chans=3, mlp_ratio=2,
        )  # fmt: skip
    raise KeyError(name)


def save(net: torch.nn.Module, path: Path) -> Path:
    """The state dict as a .pth (torch.save, what model sites ship) or .safetensors file."""
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path
