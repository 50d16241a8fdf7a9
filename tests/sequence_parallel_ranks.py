"""One rank of tests/test_sequence_parallel.py: `python sequence_parallel_ranks.py RANK WORLD STORE OUT`.

Every rank builds the same tiny FLUX models and inputs from fixed seeds and samples them sharded
(`denoise_sharded`) in each scenario; rank 0 writes what it got to OUT (safetensors + JSON), and the
test compares that with one process.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from dit360_blender.pipeline.flux_model import Flux, FluxParams
from dit360_blender.pipeline.sampling import Cancelled, get_sigmas, image_ids, wrap_pad, wrap_pad_ids
from dit360_blender.pipeline.sequence_parallel import SequenceParallel, denoise_sharded

TEXT, GRID_H, GRID_W, CHANNELS, STEPS = 5, 2, 4, 8, 4
# name: (ranks taking part, heads, step cache threshold, cancel before step (0 = never))
SCENARIOS = {
    "ulysses2": (2, 4, 0.0, 0),
    "ring2": (2, 3, 0.0, 0),
    "ring3": (3, 4, 0.0, 0),
    "ulysses3": (3, 6, 0.0, 0),
    "cache3": (3, 4, 0.6, 0),  # 3 full steps, 1 skipped
    "cancel3": (3, 4, 0.0, 3),
}


def tiny_model(heads: int) -> Flux:
    torch.manual_seed(heads)
    params = FluxParams(
        in_channels=CHANNELS, out_channels=CHANNELS, vec_in_dim=8, context_in_dim=16,
        hidden_size=16 * heads, num_heads=heads, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6],
    )  # fmt: skip
    return Flux(params).eval()


def inputs() -> dict:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randn(1, GRID_H * GRID_W, CHANNELS, generator=g)
    return {
        "img": wrap_pad(tokens, GRID_H, GRID_W),
        "img_ids": wrap_pad_ids(image_ids(GRID_H, GRID_W), GRID_H, GRID_W)[None],
        "txt": torch.randn(1, TEXT, 16, generator=g),
        "txt_ids": torch.zeros(1, TEXT, 3),
        "vec": torch.randn(1, 8, generator=g),
        "sigmas": get_sigmas(STEPS, GRID_H * (GRID_W + 2)),
        "guidance": 2.8,
    }


def main(rank: int, world: int, store_path: str, out: str) -> None:
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    pair = dist.new_group([0, 1])
    results, report = {}, {}
    for name, (ranks, heads, threshold, cancel_at) in SCENARIOS.items():
        if rank >= ranks:
            continue
        group = pair if ranks == 2 else dist.group.WORLD
        sp = SequenceParallel(group, group)
        steps, cancelled_at, evaluations = [], None, []

        def on_step(s, steps=steps):
            steps.append(s.latents.clone())

        def should_cancel(steps=steps, cancel_at=cancel_at):
            return cancel_at > 0 and len(steps) + 1 >= cancel_at

        x, model, forwards = inputs(), tiny_model(heads), []
        model.register_forward_pre_hook(lambda *_, f=forwards: f.append(1))  # this rank's steps
        try:
            final = denoise_sharded(
                model, x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["vec"], x["sigmas"],
                x["guidance"], sp, on_step=on_step, should_cancel=should_cancel, step_cache=threshold,
                step_latents=True, on_cache=lambda c, e=evaluations: e.append(c.full_evaluations),
            )  # fmt: skip
        except Cancelled:
            final, cancelled_at = None, len(forwards)
        # every rank's cancel step and cache count, so rank 0 can report all of them
        mine = torch.tensor(
            [-1 if cancelled_at is None else cancelled_at, evaluations[0] if evaluations else -1]
        )
        every = [torch.zeros_like(mine) for _ in range(ranks)]
        dist.all_gather(every, mine, group=group)
        if rank == 0:
            report[name] = {"mode": sp.mode_for(heads), "per_rank": [e.tolist() for e in every]}
            if final is not None:
                results[f"{name}.final"] = final.contiguous()
            for i, s in enumerate(steps):
                results[f"{name}.step{i + 1}"] = s.contiguous()
    dist.barrier()
    if rank == 0:
        save_file(results, out + ".safetensors")
        with open(out + ".json", "w", encoding="utf-8") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
