"""Loading never holds the model twice: peak RSS grows by about one copy of the weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from dit360_blender.pipeline.flux_model import Flux, FluxParams

# Peak RSS (VmHWM) is reset just before loading (Linux: clear_refs 5), and every parameter is read
# afterwards, so memory-mapped pages count too: one copy of the weights is the floor.
PROBE = r"""
import json, sys, torch
from dit360_blender.pipeline.flux_checkpoint import load_flux_transformer

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
model = load_flux_transformer(sys.argv[1], dtype=torch.float32)
total = sum(float(p.double().sum()) for p in model.parameters())
print(json.dumps({"before_kib": before, "after_kib": status("VmHWM:"), "params": sum(p.numel() for p in model.parameters())}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_peak_rss_grows_by_about_one_copy(tmp_path):
    params = FluxParams(
        vec_in_dim=64, context_in_dim=64, hidden_size=512, num_heads=4, depth=4, depth_single_blocks=8
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Flux(params).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in shapes.items()}
    path = tmp_path / "flux.safetensors"
    save_file(state, str(path))
    size = path.stat().st_size
    del state
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    growth = (report["after_kib"] - report["before_kib"]) * 1024
    assert report["params"] * 4 > 0.95 * size  # the whole file became parameters
    # one copy of the weights (plus small transients); two copies would be >= 2x the file
    assert 0.8 * size < growth < 1.4 * size, (
        f"peak RSS grew {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"
    )
