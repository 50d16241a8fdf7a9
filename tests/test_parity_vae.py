"""Parity of our BFL-layout FLUX autoencoder with diffusers' AutoencoderKL, plus loader errors.

A tiny AutoencoderKL in the FLUX configuration (4 levels, no quant convs, 16 latent channels,
scale 0.3611 / shift 0.1159) gets random weights everywhere (GroupNorm affines included, so a
swapped or dropped norm fails), is converted with our converter, saved as ``ae.safetensors``
and loaded back with ``load_autoencoder``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from dit360_blender.pipeline.errors import BadCheckpointError, WeightsMissingError
from dit360_blender.pipeline.vae_checkpoint import convert_diffusers_vae_to_bfl, load_autoencoder
from dit360_blender.pipeline.vae_model import FLUX_DEV_AE, AutoEncoder, AutoEncoderParams

SCALE, SHIFT = 0.3611, 0.1159
REL_TOL = 1e-5

# Tiny FLUX-shaped config: channels 8/16/16/16 exercise both nin_shortcut (8 -> 16) and plain
# skips; layers_per_block=2 like the real model (so the decoder has 3 blocks per level).
TINY_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": SCALE,
    "shift_factor": SHIFT,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}

# The shape of FLUX.1-dev's vae/config.json (what diffusers' conversion script writes).
FLUX_DEV_DIFFUSERS_CONFIG = dict(
    TINY_CONFIG, block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024
)


def _poison(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere: norms around 1, biases non-zero, convs/linears fan-in scaled."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1.0 + 0.3 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / math.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))


def make_tiny_diffusers_vae(seed: int = 0) -> AutoencoderKL:
    """A poisoned tiny AutoencoderKL in the FLUX configuration, float32, eval mode."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_CONFIG)
    _poison(vae, seed)
    return vae.float().eval()


def tiny_params() -> AutoEncoderParams:
    """Our params equal to TINY_CONFIG."""
    return AutoEncoderParams(resolution=64, ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=2, norm_groups=4)


def save_bfl(vae: AutoencoderKL, path: Path) -> Path:
    """Write the diffusers weights as a BFL-layout ae.safetensors, through our converter."""
    state = convert_diffusers_vae_to_bfl({k: v.contiguous() for k, v in vae.state_dict().items()})
    save_file(state, str(path))
    return path


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Shared tiny model, its ae.safetensors, a latent and an image (built once: keeps the file fast)."""
    tmp = tmp_path_factory.mktemp("vae")
    vae = make_tiny_diffusers_vae()
    gen = torch.Generator().manual_seed(1)
    return {
        "vae": vae,
        "ae_path": save_bfl(vae, tmp / "ae.safetensors"),
        "tmp": tmp,
        "z": torch.randn(1, 16, 8, 16, generator=gen),
        "x": torch.rand(1, 3, 64, 128, generator=gen) * 2 - 1,
    }


@torch.no_grad()
def _diffusers_decode(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    return vae.decode(z / SCALE + SHIFT).sample


@torch.no_grad()
def test_parity_decode_ae_safetensors(tiny: dict) -> None:
    ae = load_autoencoder(tiny["ae_path"], params=tiny_params())
    ref = _diffusers_decode(tiny["vae"], tiny["z"])
    out = ae.decode(tiny["z"])
    assert out.shape == ref.shape == (1, 3, 64, 128)
    assert ref.abs().max() > 0.1  # the reference is not trivially small
    err = rel_err(out, ref)
    print(f"decode rel err {err:.2e}")
    assert err <= REL_TOL


@torch.no_grad()
def test_parity_encode_ae_safetensors(tiny: dict) -> None:
    ae = load_autoencoder(tiny["ae_path"], params=tiny_params())
    ref = (tiny["vae"].encode(tiny["x"]).latent_dist.mode() - SHIFT) * SCALE
    out = ae.encode(tiny["x"])
    assert out.shape == ref.shape == (1, 16, 8, 16)
    err = rel_err(out, ref)
    print(f"encode rel err {err:.2e}")
    assert err <= REL_TOL
    assert torch.equal(out, ae.encode(tiny["x"]))  # deterministic (the mean, not a sample)


@torch.no_grad()
def test_parity_decode_diffusers_folder(tiny: dict) -> None:
    folder = tiny["tmp"] / "model" / "vae"
    tiny["vae"].save_pretrained(folder)
    ref = _diffusers_decode(tiny["vae"], tiny["z"])
    # params come from config.json: the default (full-size) params must be ignored
    for path in (folder, folder.parent):  # the vae/ folder itself or the model root above it
        ae = load_autoencoder(path)
        assert ae.params.ch_mult == (1, 2, 2, 2) and ae.params.norm_groups == 4
        assert ae.params.shift_factor == pytest.approx(SHIFT) and ae.params.scale_factor == pytest.approx(
            SCALE
        )
        err = rel_err(ae.decode(tiny["z"]), ref)
        print(f"decode (diffusers folder {path.name}) rel err {err:.2e}")
        assert err <= REL_TOL


@torch.no_grad()
def test_parity_decode_prefixed_all_in_one(tiny: dict, tmp_path: Path) -> None:
    """An all-in-one file with the VAE under 'vae.' next to other models' tensors."""
    bfl = convert_diffusers_vae_to_bfl(tiny["vae"].state_dict())
    state = {f"vae.{k}": v.contiguous() for k, v in bfl.items()}
    state["model.diffusion_model.img_in.weight"] = torch.zeros(4, 4)
    save_file(state, str(tmp_path / "all_in_one.safetensors"))
    ae = load_autoencoder(tmp_path / "all_in_one.safetensors", params=tiny_params())
    assert rel_err(ae.decode(tiny["z"]), _diffusers_decode(tiny["vae"], tiny["z"])) <= REL_TOL


def test_load_dtype_device_and_no_meta(tiny: dict) -> None:
    ae = load_autoencoder(tiny["ae_path"], params=tiny_params(), dtype=torch.bfloat16)
    tensors = list(ae.state_dict().values())
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
    assert not any(p.requires_grad for p in ae.parameters()) and not ae.training
    with torch.no_grad():
        out = ae.decode(tiny["z"])  # float32 input is cast to the model dtype
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_full_size_layout_matches_diffusers_flux_config() -> None:
    """FLUX_DEV_AE has exactly the keys/shapes of FLUX.1-dev's vae/ after conversion (meta: no RAM)."""
    with torch.device("meta"):
        ref = AutoencoderKL(**FLUX_DEV_DIFFUSERS_CONFIG)
        ours = AutoEncoder(FLUX_DEV_AE)
    converted = {k: tuple(v.shape) for k, v in convert_diffusers_vae_to_bfl(ref.state_dict()).items()}
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert converted == expected
    # spot-check BFL names that ae.safetensors is known to contain
    for key, shape in {
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
        "decoder.mid.attn_1.proj_out.bias": (512,),
        "decoder.norm_out.weight": (128,),
    }.items():
        assert expected[key] == shape, key
    assert "decoder.up.0.upsample.conv.weight" not in expected
    # eps 1e-6 everywhere: a 1e-5 eps shifts the tiny model's outputs by only ~1e-5, too little for
    # the parity tolerance to be a reliable guard, so it is checked here directly.
    norms = [(m.eps, m.num_groups, m.affine) for m in ours.modules() if isinstance(m, torch.nn.GroupNorm)]
    ref_norms = [(m.eps, m.num_groups, m.affine) for m in ref.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert sorted(norms) == sorted(ref_norms) and {n[0] for n in norms} == {1e-6}
    assert "encoder.down.3.downsample.conv.weight" not in expected


def test_truncated_file_is_bad_checkpoint(tiny: dict, tmp_path: Path) -> None:
    data = tiny["ae_path"].read_bytes()
    broken = tmp_path / "ae.safetensors"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadCheckpointError, match="truncated"):
        load_autoencoder(broken, params=tiny_params())


def test_foreign_keys_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    save_file(
        {
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4),
        },
        str(path),
    )
    with pytest.raises(BadCheckpointError) as info:
        load_autoencoder(path, params=tiny_params())
    msg = str(info.value)
    assert "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight" in msg
    assert "missing keys" in msg and "ae.safetensors" in msg  # says which layout is expected


def test_wrong_shapes_are_listed(tiny: dict) -> None:
    with pytest.raises(
        BadCheckpointError,
        match=r"wrong shapes: decoder\.conv_out\.weight \(3, 8, 3, 3\) \(expected \(3, 16, 3, 3\)\)",
    ):
        load_autoencoder(
            tiny["ae_path"], params=AutoEncoderParams(ch=16, ch_mult=(1, 1, 1, 1), norm_groups=4)
        )


def test_missing_key_is_listed(tiny: dict, tmp_path: Path) -> None:
    state = convert_diffusers_vae_to_bfl(tiny["vae"].state_dict())
    del state["decoder.mid.attn_1.k.bias"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ae.safetensors"))
    with pytest.raises(BadCheckpointError, match=r"missing keys: decoder\.mid\.attn_1\.k\.bias"):
        load_autoencoder(tmp_path / "ae.safetensors", params=tiny_params())


def test_sd_style_diffusers_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY_CONFIG, use_quant_conv=True)))
    save_file(
        {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)},
        str(tmp_path / "diffusion_pytorch_model.safetensors"),
    )
    with pytest.raises(BadCheckpointError, match="quant_conv"):
        load_autoencoder(tmp_path)


def test_missing_path_is_weights_missing(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissingError, match="not found"):
        load_autoencoder(tmp_path / "nope" / "ae.safetensors")
    with pytest.raises(WeightsMissingError, match=r"config\.json"):
        load_autoencoder(tmp_path)  # an empty folder: neither ae.safetensors nor a vae/ folder
