"""The compiled decode (`AutoEncoder.compile_decoder`, on with compile on CUDA): the same image as the
eager decoder, the module's weights and names untouched, and no recompile for a second size.

Inductor needs a GPU to be worth it; here torch.compile runs with the "aot_eager" backend, which
traces the decoder through Dynamo and AOTAutograd exactly as Inductor receives it, without codegen.
"""

from __future__ import annotations

import pytest
import torch

from dit360_blender.pipeline.vae_model import AutoEncoder, AutoEncoderParams

TINY = AutoEncoderParams(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, norm_groups=4)


def _random_vae() -> AutoEncoder:
    torch.manual_seed(3)
    vae = AutoEncoder(TINY)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.3 if p.ndim > 1 else 0.05)
    return vae.eval()


@pytest.fixture(scope="module")
def compiled_and_reference():
    torch._dynamo.reset()
    return _random_vae(), _random_vae()


@pytest.mark.parametrize("wrap", [True, False])
def test_the_compiled_decode_is_the_eager_decode(compiled_and_reference, wrap):
    vae, reference = compiled_and_reference
    names = sorted(vae.state_dict())
    if vae._compiled is None:
        vae.compile_decoder(backend="aot_eager")
    z = torch.randn(1, 4, 6, 12, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        want = reference.decode(z, wrap=wrap)
        got = vae.decode(z, wrap=wrap)
    assert vae._compiled_shape == (1, 4, 6, 12)  # the compiled path ran
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, torch.zeros_like(got)) and got.std() > 0.01
    assert sorted(vae.state_dict()) == names  # nothing registered beside the real weights
    if wrap:  # the wrap padding survives tracing: the image's two edges continue each other
        left, right = got[..., 0], got[..., -1]
        inner = (got[..., 1:] - got[..., :-1]).abs().mean()
        assert (left - right).abs().mean() < 3 * inner


def test_another_size_decodes_eagerly_and_equally(compiled_and_reference):
    vae, reference = compiled_and_reference
    if vae._compiled is None:
        vae.compile_decoder(backend="aot_eager")
    with torch.inference_mode():
        vae.decode(torch.randn(1, 4, 6, 12), wrap=True)  # fixes the compiled size
        z = torch.randn(1, 4, 4, 10, generator=torch.Generator().manual_seed(8))
        got, want = vae.decode(z, wrap=True), reference.decode(z, wrap=True)
        tiled = vae.decode_tiled(z, tile=2, wrap=True)  # the tiled path stays eager too
    assert vae._compiled_shape == (1, 4, 6, 12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiled, want, rtol=1e-4, atol=1e-4)
