"""The default upscale model (pipeline/model_files/sr_catalogue.py) found and downloaded through the
same hub code as the main model, against the local fake Hub of tests/test_hub.py (a real HTTP server
on 127.0.0.1 that answers what huggingface_hub asks)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

import huggingface_hub.constants as hf_constants  # noqa: E402
from test_hub import COMMITS, FakeHub, hf_env  # noqa: E402, F401  (hf_env: a private HF home per test)

from dit360_blender.pipeline.errors import DownloadError, WeightsMissingError  # noqa: E402
from dit360_blender.pipeline.model_files.sr_catalogue import (  # noqa: E402
    SR_DIR,
    SR_FILE,
    SR_LICENSE,
    SR_REPO,
    SR_URL,
    find_sr_model,
    resolve_sr_model,
)

MODEL_BYTES = bytes(range(256)) * 40  # stands in for the 67 MB .pth (its bytes are compared)


@pytest.fixture
def sr_hub(monkeypatch):
    server = FakeHub()
    server.repos[SR_REPO] = {SR_FILE: MODEL_BYTES, "README.md": b"---\nlicense: bsd-3-clause\n---\n"}
    monkeypatch.setitem(COMMITS, SR_REPO, "c" * 40)
    yield server
    server.close()


def gets(hub: FakeHub) -> list[str]:
    return [p for p in hub.gets() if p.startswith(f"/{SR_REPO}/")]


def test_downloaded_into_the_models_folder_once_then_found_without_a_request(sr_hub, tmp_path):
    models = tmp_path / "models"
    events = []
    path = resolve_sr_model(
        models_dir=models, allow_download=True, progress=lambda *e: events.append(e), endpoint=sr_hub.url
    )
    assert path == models / SR_DIR / SR_FILE and path.read_bytes() == MODEL_BYTES
    assert gets(sr_hub) == [f"/{SR_REPO}/resolve/main/{SR_FILE}"]  # the one file, once
    assert events[-1] == (SR_FILE, len(MODEL_BYTES), len(MODEL_BYTES))
    assert [d for _, d, _ in events] == sorted(d for _, d, _ in events)
    sr_hub.requests.clear()
    assert resolve_sr_model(models_dir=models, endpoint=sr_hub.url) == path
    assert find_sr_model(models) == path and sr_hub.requests == []


def test_downloaded_into_the_cache_without_a_models_folder(sr_hub):
    path = resolve_sr_model(allow_download=True, endpoint=sr_hub.url)
    assert path.read_bytes() == MODEL_BYTES
    assert Path(hf_constants.HF_HUB_CACHE) in path.parents and "models--nateraw--real-esrgan" in str(path)
    sr_hub.requests.clear()
    assert resolve_sr_model() == path and sr_hub.requests == []


def test_a_file_the_user_picked_is_used_as_it_is_and_a_missing_one_is_an_error(sr_hub, tmp_path):
    mine = tmp_path / "4x_mine.safetensors"
    mine.write_bytes(b"x")
    assert resolve_sr_model(mine, allow_download=True, endpoint=sr_hub.url) == mine
    with pytest.raises(WeightsMissingError) as err:
        resolve_sr_model(tmp_path / "gone.pth", allow_download=True, endpoint=sr_hub.url)
    assert "gone.pth" in err.value.message and SR_FILE in err.value.hint
    assert sr_hub.requests == []


def test_missing_without_download_says_what_where_and_which_licence(tmp_path):
    with pytest.raises(WeightsMissingError) as err:
        resolve_sr_model(models_dir=tmp_path / "m")
    assert SR_FILE in err.value.message and SR_LICENSE in err.value.message
    assert str(tmp_path / "m" / SR_DIR / SR_FILE) in err.value.hint and SR_URL in err.value.hint
    assert not (tmp_path / "m").exists()


def test_offline_gives_the_main_models_error_with_the_copy_by_hand_line(sr_hub, tmp_path, monkeypatch):
    models = tmp_path / "models"
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError) as err:
        resolve_sr_model(models_dir=models, allow_download=True, endpoint=sr_hub.url)
    assert "No connection" in err.value.message and "HF_HUB_OFFLINE" in err.value.message
    assert "upscale model" in err.value.message and str(models / SR_DIR / SR_FILE) in err.value.hint
    assert sr_hub.requests == []
    assert not (models / SR_DIR / SR_FILE).exists()


def test_a_hub_without_the_repository_or_failing_mid_file_leaves_no_model(sr_hub, tmp_path):
    models = tmp_path / "models"
    sr_hub.fail_get = {SR_FILE}
    with pytest.raises(DownloadError) as err:
        resolve_sr_model(models_dir=models, allow_download=True, endpoint=sr_hub.url)
    assert "HTTP 500" in err.value.message and SR_REPO in err.value.message
    assert find_sr_model(models) is None
    sr_hub.missing_repos = {SR_REPO}
    with pytest.raises(DownloadError) as err:
        resolve_sr_model(models_dir=models, allow_download=True, endpoint=sr_hub.url)
    assert "does not exist" in err.value.message and SR_URL in err.value.hint
