"""The VAE decode of a 2048x1024 panorama, several ways, in one process (issue #13's tail).

    python -m dit360_blender.bench.decode_variants --json out.json

Random FLUX VAE weights (the real shapes), bf16 on the GPU, one (1, 16, 128, 256) latent, the
decoder's wrap padding on (what a job uses). Each variant is timed with CUDA events (median of
`--repeats` after warm-ups, compile included in the warm-ups and reported apart) and compared with
an fp32 eager decode of the same weights: the relative RMS error says whether a variant is as
faithful as the bf16 eager path it would replace. Also times the hand-over to the CPU (float32
vs uint8 on the GPU first). No timings are asserted anywhere: this prints and writes numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dit360_blender.bench.cuda_timing import cuda_median
from dit360_blender.pipeline.vae_model import AutoEncoder


def _random_vae(seed: int) -> AutoEncoder:
    torch.manual_seed(seed)
    vae = AutoEncoder()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.ndim == 1:  # 1-D weights are the norms' scales (near 1); biases small
                p.copy_(torch.ones_like(p) if name.endswith(".weight") else 0.02 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in**0.5)
    return vae.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    vae32 = _random_vae(0).to(device)
    z = torch.randn(1, 16, 128, 256, device=device, generator=torch.Generator(device).manual_seed(1))
    with torch.inference_mode():
        reference = vae32.decode(z, wrap=True).float()
    vae = _random_vae(0).to(device, torch.bfloat16)
    del vae32
    torch.cuda.empty_cache()
    record: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "variants": {}}

    def variant(name: str, decode, warmups: int = 2) -> None:
        with torch.inference_mode():
            step_s, warm_s = cuda_median(decode, args.repeats, warmups)
            out = decode().float()
        err = float(((out - reference).pow(2).mean() / reference.pow(2).mean()).sqrt())
        record["variants"][name] = {"decode_s": step_s, "warmups_s": warm_s, "rel_rms_vs_fp32": err}
        print(
            f"{name:36s} {step_s * 1000:7.1f} ms  (warm-ups {warm_s:6.1f} s)  rel rms {err:.2e}", flush=True
        )

    variant("bf16 eager", lambda: vae.decode(z, wrap=True))
    variant("bf16 eager, tiled 64", lambda: vae.decode_tiled(z, tile=64, wrap=True))
    vae_cl = _random_vae(0).to(device, torch.bfloat16).to(memory_format=torch.channels_last)
    variant(
        "bf16 channels_last",
        lambda: vae_cl.decode(z.contiguous(memory_format=torch.channels_last), wrap=True),
    )
    compiled = torch.compile(vae.decoder, dynamic=False)
    variant(
        "bf16 torch.compile(decoder)",
        lambda: compiled(z.to(torch.bfloat16) / vae.scale_factor + vae.shift_factor, True),
        warmups=3,
    )
    compiled_cl = torch.compile(vae_cl.decoder, dynamic=False)
    variant(
        "bf16 compile + channels_last",
        lambda: compiled_cl(
            (z.to(torch.bfloat16) / vae.scale_factor + vae.shift_factor).contiguous(
                memory_format=torch.channels_last
            ),
            True,
        ),
        warmups=3,
    )
    with torch.inference_mode():
        image = vae.decode(z, wrap=True)
        to_cpu_float, _ = cuda_median(lambda: (image[0].float() / 2 + 0.5).clamp(0, 1).cpu(), args.repeats, 1)
        to_cpu_u8, _ = cuda_median(
            lambda: ((image[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu(),
            args.repeats,
            1,
        )
    record["to_cpu"] = {"float32_s": to_cpu_float, "uint8_on_gpu_s": to_cpu_u8}
    print(
        f"to the CPU: float32 {to_cpu_float * 1000:.1f} ms, uint8 made on the GPU {to_cpu_u8 * 1000:.1f} ms"
    )
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
