"""Model resolution and download (dit360_blender.pipeline.model_files) against a local fake Hugging Face Hub.

The fake Hub is a threaded ``http.server`` on 127.0.0.1 that answers the endpoints the installed
huggingface_hub calls: ``GET /api/models/{repo}/revision/{rev}`` (repo listing + commit sha) and
``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (``X-Repo-Commit``, ``ETag``, ``Content-Length``,
``Range``), with the Hub's gated-repo answers (401/403 + ``X-Error-Code: GatedRepo``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import struct
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

pytest.importorskip("huggingface_hub")

import huggingface_hub.constants as hf_constants  # noqa: E402

from dit360_blender.pipeline.errors import (  # noqa: E402
    BadParametersError,
    DownloadError,
    GatedRepoAccessError,
    WeightsMissingError,
)
from dit360_blender.pipeline.model_files.catalogue import (  # noqa: E402
    COMPONENTS,
    FLUX_LICENSE_URL,
    FLUX_REPO,
    LORA_REPO,
    ModelPaths,
    pick_lora,
)
from dit360_blender.pipeline.model_files.download import (  # noqa: E402
    _progress_bar_class,
    download_models,
    resolve_model_paths,
)
from dit360_blender.pipeline.model_files.local_search import find_model_paths  # noqa: E402

TOKEN = "hf_TESTsecretTOKEN1234567890abcdef"
COMMITS = {FLUX_REPO: "a" * 40, LORA_REPO: "b" * 40}


def st_bytes(n_data: int, fill: int = 7) -> bytes:
    """A valid safetensors file holding one uint8 tensor of ``n_data`` bytes."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [n_data], "data_offsets": [0, n_data]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + bytes([fill % 256]) * n_data


def make_repos() -> dict[str, dict[str, bytes]]:
    index = {
        "metadata": {"total_size": 2 * 5000},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    flux = {
        "flux1-dev.safetensors": st_bytes(20000, 1),
        "ae.safetensors": st_bytes(3000, 2),
        "text_encoder/config.json": b'{"model_type": "clip_text_model"}',
        "text_encoder/model.safetensors": st_bytes(2000, 3),
        "tokenizer/merges.txt": b"#version: 0.2\n",
        "tokenizer/vocab.json": b'{"a": 0}',
        "tokenizer/tokenizer_config.json": b"{}",
        "tokenizer/special_tokens_map.json": b"{}",
        "text_encoder_2/config.json": b'{"model_type": "t5"}',
        "text_encoder_2/model-00001-of-00002.safetensors": st_bytes(5000, 4),
        "text_encoder_2/model-00002-of-00002.safetensors": st_bytes(5000, 5),
        "text_encoder_2/model.safetensors.index.json": json.dumps(index).encode(),
        "tokenizer_2/spiece.model": b"spiece",
        "tokenizer_2/tokenizer.json": b"{}",
        "tokenizer_2/tokenizer_config.json": b"{}",
        "tokenizer_2/special_tokens_map.json": b"{}",
        # never to be downloaded: diffusers duplicates and unrelated files
        "transformer/config.json": b"{}",
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors": st_bytes(100, 9),
        "vae/config.json": b"{}",
        "vae/diffusion_pytorch_model.safetensors": st_bytes(100, 9),
        "model_index.json": b"{}",
        "README.md": b"# FLUX.1 [dev]",
        "dev_grid.jpg": b"\xff\xd8",
    }
    lora = {
        "adapter_model.safetensors": st_bytes(4000, 6),
        "adapter_config.json": b'{"r": 64}',
        "README.md": b"# DiT360",
        "old/checkpoint-500.safetensors": st_bytes(100, 9),
    }
    for files in (flux, lora):  # distinct contents (identical ones share one cache blob, one GET)
        for name, data in files.items():
            if data == b"{}":
                files[name] = json.dumps({"file": name}).encode()
    return {FLUX_REPO: flux, LORA_REPO: lora}


class FakeHub:
    """State of the fake Hub, shared with the request handler threads."""

    def __init__(self) -> None:
        self.repos = make_repos()
        self.gated = {FLUX_REPO}  # needs "Authorization: Bearer TOKEN" on /resolve
        self.missing_repos: set[str] = set()
        self.drop_once: set[str] = set()  # GET of these paths is cut half-way, once
        self.fail_get: set[str] = set()  # GET of these paths answers 500
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                fake.handle(self, head=True)

            def do_GET(self) -> None:
                fake.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def gets(self, path_suffix: str = "") -> list[str]:
        """Paths of the file GETs made so far (ending with ``path_suffix``)."""
        return [p for m, p, _ in self.requests if m == "GET" and "/resolve/" in p and p.endswith(path_suffix)]

    # -- request handling -------------------------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self.lock:
            self.requests.append(
                ("HEAD" if head else "GET", path, {k.lower(): v for k, v in h.headers.items()})
            )
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            return self.api_model(h, repo)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = "/".join(parts[:2])
            return self.resolve(h, repo, "/".join(parts[4:]), head)
        return self.error(h, 404, "RepoNotFound", "Repository not found")

    def send(self, h, status: int, headers: dict[str, str], body: bytes = b"", head: bool = False) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def error(self, h, status: int, code: str | None, message: str, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        if code:
            headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message
        self.send(h, status, headers, body, head)

    def api_model(self, h, repo: str) -> None:
        if repo not in self.repos or repo in self.missing_repos:
            return self.error(h, 404, "RepoNotFound", "Repository not found")
        body = json.dumps(
            {
                "id": repo,
                "modelId": repo,
                "sha": COMMITS[repo],
                "private": False,
                "gated": "manual" if repo in self.gated else False,
                "siblings": [{"rfilename": name} for name in sorted(self.repos[repo])],
            }
        ).encode()
        self.send(h, 200, {"Content-Type": "application/json", "Content-Length": str(len(body))}, body)

    def resolve(self, h, repo: str, filename: str, head: bool) -> None:
        if repo not in self.repos or repo in self.missing_repos:
            return self.error(h, 404, "RepoNotFound", "Repository not found", head)
        if repo in self.gated:
            auth = h.headers.get("Authorization")
            if not auth:
                return self.error(
                    h,
                    401,
                    "GatedRepo",
                    f"Access to model {repo} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in.",
                    head,
                )
            if auth != f"Bearer {TOKEN}":
                return self.error(
                    h,
                    403,
                    "GatedRepo",
                    f"Access to model {repo} is restricted and you are not in the authorized list. "
                    f"Visit https://huggingface.co/{repo} to ask for access.",
                    head,
                )
        data = self.repos[repo].get(filename)
        if data is None:
            return self.error(h, 404, "EntryNotFound", f"{filename} does not exist", head)
        headers = {
            "X-Repo-Commit": COMMITS[repo],
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if head:
            headers["Content-Length"] = str(len(data))
            return self.send(h, 200, headers, head=True)
        if filename in self.fail_get:
            return self.error(h, 500, None, "Internal Error")
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[len("bytes=") :].split("-")[0])
        body = data[start:]
        headers["Content-Length"] = str(len(body))
        status = 200
        if start:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if filename in self.drop_once:
            self.drop_once.discard(filename)
            self.send(h, status, headers, body[: len(body) // 2])
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        self.send(h, status, headers, body)


@pytest.fixture
def fake_hub():
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def hf_env(tmp_path, monkeypatch):
    """A private, empty Hugging Face home for each test; no token from the developer's machine."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads its environment once, at import: patch the values it already read.
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 1024)  # several progress steps per file
    return home / "hub"


FLUX_NEEDED = [
    "flux1-dev.safetensors",
    "ae.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "text_encoder_2/config.json",
    "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.json",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
]
LORA_NEEDED = ["adapter_model.safetensors", "adapter_config.json"]


def downloaded_files(fake: FakeHub) -> set[str]:
    out = set()
    for p in fake.gets():
        org, name, _, _, rel = p.strip("/").split("/", 4)
        out.add(f"{org}/{name}:{rel}")
    return out


def expected_files(use_lora: bool = True) -> set[str]:
    files = {f"{FLUX_REPO}:{f}" for f in FLUX_NEEDED}
    if use_lora:
        files |= {f"{LORA_REPO}:{f}" for f in LORA_NEEDED}
    return files


def check_paths(paths: ModelPaths, flux_root: Path, lora_root: Path, fake: FakeHub) -> None:
    flux = fake.repos[FLUX_REPO]
    assert paths.transformer == flux_root / "flux1-dev.safetensors"
    assert paths.transformer.read_bytes() == flux["flux1-dev.safetensors"]
    assert paths.vae == flux_root / "ae.safetensors"
    assert paths.vae.read_bytes() == flux["ae.safetensors"]
    for c in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        assert getattr(paths, c) == flux_root / c
    for f in FLUX_NEEDED:
        assert (flux_root / f).read_bytes() == flux[f], f
    for bad in ("transformer", "vae", "README.md", "model_index.json"):
        assert not (flux_root / bad).exists(), bad
    assert paths.lora == lora_root / "adapter_model.safetensors"
    assert paths.lora.read_bytes() == fake.repos[LORA_REPO]["adapter_model.safetensors"]
    assert (lora_root / "adapter_config.json").is_file()
    assert not (lora_root / "old").exists()


def secret_nowhere(err: BaseException, caplog, secret: str = TOKEN) -> None:
    texts = [
        str(err),
        repr(err),
        json.dumps(err.to_dict()),
        "".join(traceback.format_exception(type(err), err, err.__traceback__)),
        caplog.text,
    ]
    for text in texts:
        assert secret not in text
    assert err.__cause__ is None and err.__context__ is None


# ------------------------------------------------------------------------------------------------


def test_download_into_cache_with_token_then_found_offline(fake_hub, hf_env):
    events: list[tuple[str, int, int]] = []
    paths = resolve_model_paths(
        allow_download=True,
        token=TOKEN,
        progress=lambda f, done, total: events.append((f, done, total)),
        endpoint=fake_hub.url,
    )
    # exactly the needed files, each fetched once
    assert downloaded_files(fake_hub) == expected_files()
    assert len(fake_hub.gets()) == len(expected_files())
    # the token went with every request to the gated repo
    for method, path, headers in fake_hub.requests:
        if path.startswith(f"/{FLUX_REPO}/resolve/"):
            assert headers.get("authorization") == f"Bearer {TOKEN}", (method, path)

    flux_root = hf_env / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / COMMITS[FLUX_REPO]
    lora_root = (
        hf_env
        / "models--Insta360-Research--DiT360-Panorama-Image-Generation"
        / "snapshots"
        / COMMITS[LORA_REPO]
    )
    check_paths(paths, flux_root, lora_root, fake_hub)

    # progress: per file, bytes never go down and end at the file size
    by_file: dict[str, list[tuple[int, int]]] = {}
    for f, done, total in events:
        by_file.setdefault(f, []).append((done, total))
    assert set(by_file) == set(FLUX_NEEDED) | set(LORA_NEEDED)
    for f, seq in by_file.items():
        dones = [d for d, _ in seq]
        assert dones == sorted(dones), f
        size = len({**fake_hub.repos[FLUX_REPO], **fake_hub.repos[LORA_REPO]}[f])
        assert seq[-1] == (size, size), f
    assert len(by_file["flux1-dev.safetensors"]) > 10  # 20 kB in 1 kB chunks

    # found again in the cache without a single request, with or without allow_download
    fake_hub.requests.clear()
    assert resolve_model_paths(endpoint=fake_hub.url) == paths
    assert resolve_model_paths(allow_download=True, endpoint=fake_hub.url) == paths
    assert download_models(endpoint=fake_hub.url) == paths
    assert find_model_paths() == paths.as_dict()
    assert fake_hub.requests == []


def test_download_into_models_dir_with_env_token(fake_hub, tmp_path, monkeypatch, hf_env):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    models = tmp_path / "models"
    paths = download_models(models_dir=models, endpoint=fake_hub.url)
    assert downloaded_files(fake_hub) == expected_files()
    check_paths(paths, models / "FLUX.1-dev", models / "DiT360", fake_hub)
    assert not hf_env.exists() or not any(hf_env.glob("models--*/snapshots/*/*"))

    fake_hub.requests.clear()
    monkeypatch.delenv("HF_TOKEN")
    assert resolve_model_paths(models_dir=models, endpoint=fake_hub.url) == paths
    assert fake_hub.requests == []


def test_use_lora_false_skips_lora(fake_hub, tmp_path):
    paths = resolve_model_paths(
        models_dir=tmp_path / "m", allow_download=True, token=TOKEN, use_lora=False, endpoint=fake_hub.url
    )
    assert paths.lora is None
    assert downloaded_files(fake_hub) == expected_files(use_lora=False)
    assert not any(LORA_REPO in p for _, p, _ in fake_hub.requests)


def write_layout(root: Path, repos: dict[str, dict[str, bytes]]) -> None:
    for repo, sub in ((FLUX_REPO, "FLUX.1-dev"), (LORA_REPO, "DiT360")):
        for name in FLUX_NEEDED if repo == FLUX_REPO else LORA_NEEDED:
            target = root / sub / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(repos[repo][name])


def test_explicit_beats_models_dir_beats_cache(fake_hub, tmp_path, hf_env):
    cached = resolve_model_paths(allow_download=True, token=TOKEN, endpoint=fake_hub.url)
    models = tmp_path / "models"
    write_layout(models, fake_hub.repos)
    (models / "FLUX.1-dev" / "ae.safetensors").unlink()  # -> the VAE still comes from the cache
    shutil_lora = models / "DiT360"
    for f in shutil_lora.iterdir():
        f.unlink()
    shutil_lora.rmdir()  # -> the LoRA comes from the cache too

    mine = tmp_path / "elsewhere" / "my-flux.safetensors"
    mine.parent.mkdir()
    mine.write_bytes(st_bytes(10))
    lora_dir = tmp_path / "my-lora"
    lora_dir.mkdir()
    (lora_dir / "dit360_lora.safetensors").write_bytes(st_bytes(10))
    diffusers_vae = tmp_path / "vae"
    diffusers_vae.mkdir()

    fake_hub.requests.clear()
    paths = resolve_model_paths(
        explicit={"transformer": str(mine), "lora": lora_dir, "text_encoder": None},
        models_dir=models,
        endpoint=fake_hub.url,
    )
    assert fake_hub.requests == []
    assert paths.transformer == mine
    assert paths.lora == lora_dir / "dit360_lora.safetensors"
    assert paths.vae == cached.vae
    assert paths.text_encoder == models / "FLUX.1-dev" / "text_encoder"
    assert paths.text_encoder_2 == models / "FLUX.1-dev" / "text_encoder_2"
    assert paths.tokenizer_2 == models / "FLUX.1-dev" / "tokenizer_2"

    # a diffusers folder is accepted when given explicitly
    paths = resolve_model_paths(explicit={"vae": diffusers_vae}, models_dir=models)
    assert paths.vae == diffusers_vae


def test_models_dir_layout_without_hub(tmp_path):
    models = tmp_path / "models"
    write_layout(models, make_repos())
    paths = resolve_model_paths(models_dir=models)  # no endpoint at all: must not need one
    assert paths.transformer == models / "FLUX.1-dev" / "flux1-dev.safetensors"
    assert paths.tokenizer == models / "FLUX.1-dev" / "tokenizer"
    assert paths.lora == models / "DiT360" / "adapter_model.safetensors"
    assert find_model_paths(models_dir=models, use_lora=False)["lora"] is None


def test_explicit_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope" / "ae.safetensors"
    with pytest.raises(WeightsMissingError) as info:
        resolve_model_paths(explicit={"vae": missing})
    assert str(missing) in info.value.message
    assert info.value.hint
    assert find_model_paths(explicit={"vae": missing})["vae"] is None
    with pytest.raises(BadParametersError):
        resolve_model_paths(explicit={"unet": tmp_path})


def test_missing_without_download_lists_everything(tmp_path, hf_env):
    models = tmp_path / "models"
    write_layout(models, make_repos())
    (models / "FLUX.1-dev" / "flux1-dev.safetensors").unlink()
    for f in (models / "FLUX.1-dev" / "text_encoder_2").glob("model-00002*"):
        f.unlink()
    with pytest.raises(WeightsMissingError) as info:
        resolve_model_paths(models_dir=models)
    err = info.value
    first = err.message.splitlines()[0]
    assert "transformer" in first and "text_encoder_2" in first and "vae" not in first
    assert "flux1-dev.safetensors" in err.message
    assert "model-00002-of-00002.safetensors" in err.message  # why text_encoder_2 does not count
    assert str(models / "FLUX.1-dev") in err.message
    assert str(hf_env) in err.message
    assert "--download" in err.hint and "Preferences" in err.hint
    assert FLUX_LICENSE_URL in err.hint
    assert str(models / "FLUX.1-dev" / "flux1-dev.safetensors") in err.hint

    with pytest.raises(WeightsMissingError) as info:
        resolve_model_paths()
    assert all(c in info.value.message.splitlines()[0] for c in COMPONENTS)
    found = find_model_paths()
    assert set(found) == set(COMPONENTS) and all(v is None for v in found.values())


def test_truncated_file_does_not_count_and_is_replaced(fake_hub, tmp_path):
    models = tmp_path / "models"
    write_layout(models, fake_hub.repos)
    flux = models / "FLUX.1-dev" / "flux1-dev.safetensors"
    flux.write_bytes(fake_hub.repos[FLUX_REPO]["flux1-dev.safetensors"][:5000])
    assert find_model_paths(models_dir=models)["transformer"] is None
    with pytest.raises(WeightsMissingError) as info:
        resolve_model_paths(models_dir=models)
    assert "incomplete" in info.value.message

    paths = resolve_model_paths(models_dir=models, allow_download=True, token=TOKEN, endpoint=fake_hub.url)
    assert downloaded_files(fake_hub) == {f"{FLUX_REPO}:flux1-dev.safetensors"}
    assert paths.transformer == flux
    assert flux.read_bytes() == fake_hub.repos[FLUX_REPO]["flux1-dev.safetensors"]


@pytest.mark.parametrize("token", [None, "hf_WRONGsecretTOKEN99999"])
def test_gated_repo(fake_hub, tmp_path, caplog, token):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(GatedRepoAccessError) as info:
        resolve_model_paths(
            models_dir=tmp_path / "models", allow_download=True, token=token, endpoint=fake_hub.url
        )
    err = info.value
    assert FLUX_REPO in err.message
    assert ("401" if token is None else "403") in err.message
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev" in err.hint
    assert "https://huggingface.co/settings/tokens" in err.hint
    assert "HF_TOKEN" in err.hint and "Preferences" in err.hint
    assert err.code == "download_gated"
    if token:
        secret_nowhere(err, caplog, token)


def test_gated_error_never_shows_env_token(fake_hub, tmp_path, caplog, monkeypatch):
    """A token set through HF_TOKEN never shows, whether the repo is missing or refuses the token."""
    secret = "hf_ENVsecretTOKENabcdefabcdef"
    monkeypatch.setenv("HF_TOKEN", secret)
    caplog.set_level(logging.DEBUG)
    fake_hub.missing_repos.add(FLUX_REPO)  # listing answers 404 ...
    with pytest.raises(DownloadError) as info:
        resolve_model_paths(allow_download=True, endpoint=fake_hub.url)
    assert not isinstance(info.value, GatedRepoAccessError)
    assert "does not exist" in info.value.message
    secret_nowhere(info.value, caplog, secret)
    fake_hub.missing_repos.clear()
    with pytest.raises(GatedRepoAccessError) as info:  # ... then /resolve answers 403 GatedRepo
        resolve_model_paths(allow_download=True, endpoint=fake_hub.url)
    secret_nowhere(info.value, caplog, secret)
    assert any(
        h.get("authorization") == f"Bearer {secret}" for _, p, h in fake_hub.requests if "/resolve/" in p
    )


def test_offline_mode(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    models = tmp_path / "models"
    with pytest.raises(DownloadError) as info:
        resolve_model_paths(models_dir=models, allow_download=True, token=TOKEN, endpoint=fake_hub.url)
    err = info.value
    assert "No connection" in err.message and "HF_HUB_OFFLINE" in err.message
    for f in FLUX_NEEDED:
        assert str(models / "FLUX.1-dev" / Path(f)) in err.hint, f
    assert str(models / "DiT360") in err.hint and LORA_REPO in err.hint
    assert fake_hub.requests == []

    # what is on disk still resolves while offline
    write_layout(models, fake_hub.repos)
    assert resolve_model_paths(models_dir=models, allow_download=True).lora is not None


def test_no_connection(tmp_path, caplog):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there any more
    with pytest.raises(DownloadError) as info:
        resolve_model_paths(allow_download=True, token=TOKEN, endpoint=f"http://127.0.0.1:{port}")
    err = info.value
    assert "No connection" in err.message
    assert "<models folder>" in err.hint and "flux1-dev.safetensors" in err.hint
    assert "models folder (add-on Preferences, or `--models-dir`)" in err.hint
    secret_nowhere(err, caplog)


def test_dropped_connection_resumes(fake_hub, tmp_path):
    fake_hub.drop_once = {"flux1-dev.safetensors"}
    events = []
    paths = resolve_model_paths(
        models_dir=tmp_path / "models",
        allow_download=True,
        token=TOKEN,
        progress=lambda f, d, t: events.append((f, d, t)) if f == "flux1-dev.safetensors" else None,
        endpoint=fake_hub.url,
    )
    data = fake_hub.repos[FLUX_REPO]["flux1-dev.safetensors"]
    assert paths.transformer.read_bytes() == data
    gets = [h for m, p, h in fake_hub.requests if m == "GET" and p.endswith("/flux1-dev.safetensors")]
    assert len(gets) == 2
    assert "range" not in gets[0] and gets[1]["range"].startswith("bytes=")
    assert int(gets[1]["range"][len("bytes=") :].split("-")[0]) > 0  # resumed, not restarted
    dones = [d for _, d, _ in events]
    assert dones == sorted(dones) and events[-1] == ("flux1-dev.safetensors", len(data), len(data))


def test_failure_keeps_finished_files(fake_hub, tmp_path):
    models = tmp_path / "models"
    shard = "text_encoder_2/model-00002-of-00002.safetensors"
    fake_hub.fail_get = {shard}
    with pytest.raises(DownloadError) as info:
        resolve_model_paths(models_dir=models, allow_download=True, token=TOKEN, endpoint=fake_hub.url)
    assert "500" in info.value.message and "text_encoder_2" in info.value.message
    done = models / "FLUX.1-dev"
    assert (done / "flux1-dev.safetensors").read_bytes() == fake_hub.repos[FLUX_REPO]["flux1-dev.safetensors"]
    assert (done / "text_encoder_2" / "model-00001-of-00002.safetensors").is_file()
    assert not (done / shard).exists()

    fake_hub.fail_get = set()
    paths = resolve_model_paths(models_dir=models, allow_download=True, token=TOKEN, endpoint=fake_hub.url)
    assert paths.text_encoder_2 == done / "text_encoder_2"
    assert len(fake_hub.gets("/flux1-dev.safetensors")) == 1  # not fetched again
    assert len(fake_hub.gets("/model-00001-of-00002.safetensors")) == 1
    assert len(fake_hub.gets("/" + shard)) == 2


def test_progress_exception_propagates(fake_hub, tmp_path):
    class Cancelled(Exception):
        pass

    def cancel(filename, done, total):
        if done:
            raise Cancelled

    with pytest.raises(Cancelled):
        resolve_model_paths(
            models_dir=tmp_path / "m",
            allow_download=True,
            token=TOKEN,
            progress=cancel,
            endpoint=fake_hub.url,
        )
    assert not (tmp_path / "m" / "FLUX.1-dev" / "flux1-dev.safetensors").exists()


def test_progress_bar_fits_xet_reporter():
    """Real FLUX files are served through Xet (hf_xet is installed): its progress reporter must drive
    our bar too. The fake Hub cannot speak Xet, so drive the installed reporter directly."""
    from types import SimpleNamespace

    reporter_mod = pytest.importorskip("huggingface_hub.utils._xet_progress_reporting")
    events = []
    bar = _progress_bar_class("flux1-dev.safetensors", lambda f, d, t: events.append((f, d, t)))
    reporter = reporter_mod.XetDownloadProgressReporter(
        reconstruction_desc="x", total=1000, log_level=logging.INFO, tqdm_class=bar
    )
    for done in (300, 700, 1000):
        report = SimpleNamespace(
            total_bytes_completed=done,
            total_transfer_bytes_completed=done // 2,
            total_bytes_completion_rate=None,
            total_transfer_bytes_completion_rate=None,
            total_bytes=1000,
        )
        reporter.update_progress(report)
    reporter.close()
    assert events == [("flux1-dev.safetensors", d, 1000) for d in (0, 300, 700, 1000)]


def test_pick_lora():
    assert pick_lora(["a/adapter_model.safetensors", "x.safetensors", "README.md"]) == "x.safetensors"
    assert pick_lora(["z.safetensors", "adapter_model.safetensors"]) == "adapter_model.safetensors"
    assert pick_lora(["z.safetensors", "dit360_lora.safetensors"]) == "dit360_lora.safetensors"
    assert pick_lora(["README.md"]) is None
