"""Finding and downloading the model files: FLUX.1-dev components and the DiT360 LoRA.

What is needed (about 34 GB), and nothing more:

* from ``black-forest-labs/FLUX.1-dev`` (gated: an account, an accepted licence and a token):
  ``flux1-dev.safetensors`` (transformer, BFL single-file layout), ``ae.safetensors`` (VAE),
  ``text_encoder/`` (CLIP-L), ``tokenizer/``, ``text_encoder_2/`` (T5-XXL encoder, 2 shards) and
  ``tokenizer_2/``. The diffusers ``transformer/`` and ``vae/`` folders of that repo hold the same
  weights again and are never downloaded.
* from ``Insta360-Research/DiT360-Panorama-Image-Generation`` (public): the LoRA ``.safetensors``
  and its ``adapter_config.json`` when the repo has one.

Where each component is looked for, in this order:

1. an explicit path (``explicit={"transformer": ..., ...}``); it must exist.
2. a models folder (``models_dir``) laid out like the two repos::

       models_dir/
         FLUX.1-dev/                        files of black-forest-labs/FLUX.1-dev, same relative paths
           flux1-dev.safetensors            transformer                  23.8 GB
           ae.safetensors                   VAE                           0.34 GB
           text_encoder/                    config.json, model.safetensors            (CLIP-L, 0.25 GB)
           tokenizer/                       vocab.json, merges.txt, tokenizer_config.json, ...
           text_encoder_2/                  config.json, model.safetensors.index.json,
                                            model-00001-of-00002.safetensors, model-00002-of-00002.safetensors
                                                                                      (T5-XXL encoder, 9.5 GB)
           tokenizer_2/                     spiece.model, tokenizer.json, tokenizer_config.json, ...
         DiT360/                            files of Insta360-Research/DiT360-Panorama-Image-Generation
           adapter_model.safetensors        the LoRA (whatever .safetensors name the repo uses)
           adapter_config.json              when the repo has one

3. the Hugging Face cache (``HF_HUB_CACHE``, by default ``$HF_HOME/hub``, i.e.
   ``~/.cache/huggingface/hub``), read by huggingface_hub itself with ``local_files_only=True``.
4. a download, only when ``allow_download`` is true: exactly the files listed above, into
   ``models_dir`` (layout above) when one is given, else into the Hugging Face cache.

A ``.safetensors`` file whose header describes more data than the file holds (a copy or download that
stopped part-way) does not count as present.

The token is the ``token`` argument, else whatever huggingface_hub finds (``HF_TOKEN``, then the token
saved by ``hf auth login``). It is never logged nor put in any message.

Note on resuming (huggingface_hub 1.x/2.x): a connection dropped mid-file is resumed within the same
call (an HTTP ``Range`` request, up to 5 times). A file whose download was stopped (process killed,
error) starts again from zero next time; files already complete are kept and not fetched again.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .errors import BadParametersError, DiT360Error, DownloadError, GatedRepoAccessError, WeightsMissingError

logger = logging.getLogger(__name__)

FLUX_REPO = "black-forest-labs/FLUX.1-dev"
LORA_REPO = "Insta360-Research/DiT360-Panorama-Image-Generation"
FLUX_DIR = "FLUX.1-dev"
LORA_DIR = "DiT360"

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "lora")
FLUX_COMPONENTS = COMPONENTS[:-1]

FLUX_LICENSE_URL = "https://huggingface.co/black-forest-labs/FLUX.1-dev"
TOKENS_URL = "https://huggingface.co/settings/tokens"

ProgressCallback = Callable[[str, int, int], None]

_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")

# Repo files downloaded for each component (fnmatch patterns on the repo's file names).
_PATTERNS: dict[str, tuple[str, ...]] = {
    "transformer": ("flux1-dev.safetensors",),
    "vae": ("ae.safetensors",),
    "text_encoder": (
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/model-*-of-*.safetensors",
    ),
    "tokenizer": ("tokenizer/*",),
    "text_encoder_2": (
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        "text_encoder_2/model.safetensors.index.json",
        "text_encoder_2/model-*-of-*.safetensors",
    ),
    "tokenizer_2": ("tokenizer_2/*",),
    "lora": ("*.safetensors", "adapter_config.json"),
}

# The files as they are in the repos (for messages telling what to copy where).
_KNOWN_FILES: dict[str, tuple[str, ...]] = {
    "transformer": ("flux1-dev.safetensors",),
    "vae": ("ae.safetensors",),
    "text_encoder": ("text_encoder/config.json", "text_encoder/model.safetensors"),
    "tokenizer": (
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
    ),
    "text_encoder_2": (
        "text_encoder_2/config.json",
        "text_encoder_2/model-00001-of-00002.safetensors",
        "text_encoder_2/model-00002-of-00002.safetensors",
        "text_encoder_2/model.safetensors.index.json",
    ),
    "tokenizer_2": (
        "tokenizer_2/special_tokens_map.json",
        "tokenizer_2/spiece.model",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/tokenizer_config.json",
    ),
    "lora": ("adapter_model.safetensors", "adapter_config.json"),
}

_APPROX_GB = {
    "transformer": 23.8,
    "vae": 0.34,
    "text_encoder": 0.25,
    "tokenizer": 0.01,
    "text_encoder_2": 9.52,
    "tokenizer_2": 0.01,
    "lora": 0.3,
}

_DOWNLOAD_HOW = (
    "run the worker with the `--download` flag, or press the download button in the add-on "
    "Preferences (Models)"
)
_GATED_HINT = (
    f"Log in at huggingface.co, open {FLUX_LICENSE_URL} and accept the FLUX.1 [dev] licence; "
    f"create a read token at {TOKENS_URL}; set it as the HF_TOKEN environment variable or in the "
    "add-on Preferences (Hugging Face token), then retry."
)


@dataclass
class ModelPaths:
    """Where each component was found (or downloaded to)."""

    transformer: Path  # flux1-dev.safetensors file (or a diffusers transformer/ folder when given explicitly)
    vae: Path  # ae.safetensors file (or a diffusers vae/ folder)
    text_encoder: Path  # folder
    tokenizer: Path  # folder
    text_encoder_2: Path  # folder
    tokenizer_2: Path  # folder
    lora: Path | None  # the LoRA .safetensors file (adapter_config.json beside it when the repo has one)

    def as_dict(self) -> dict[str, Path | None]:
        return {c: getattr(self, c) for c in COMPONENTS}


# --------------------------------------------------------------------------------------------------
# Public API


def find_model_paths(
    explicit: dict[str, Path | str | None] | None = None,
    models_dir: Path | str | None = None,
    use_lora: bool = True,
) -> dict[str, Path | None]:
    """Search explicit paths, ``models_dir`` and the Hugging Face cache; never download, never raise
    for a missing file. Returns every component of ``COMPONENTS``, ``None`` where it is missing
    (``lora`` is ``None`` too when ``use_lora`` is false)."""
    found, _notes = _search(explicit, models_dir, use_lora, strict=False)
    return found


def resolve_model_paths(
    explicit: dict[str, Path | str | None] | None = None,
    models_dir: Path | str | None = None,
    allow_download: bool = False,
    token: str | None = None,
    progress: ProgressCallback | None = None,
    use_lora: bool = True,
    endpoint: str | None = None,
) -> ModelPaths:
    """Find every component (explicit path, then ``models_dir``, then the Hugging Face cache) and,
    when ``allow_download`` is true, download the missing ones.

    ``progress(filename, bytes_done, bytes_total)`` is called while each repo file downloads
    (``filename`` relative to its repo; ``bytes_total`` is 0 when unknown). An exception raised by
    ``progress`` (e.g. to cancel) propagates unchanged. ``endpoint`` overrides the Hub URL
    (default: huggingface_hub's, i.e. ``HF_ENDPOINT`` or https://huggingface.co).

    Raises WeightsMissingError (an explicit path does not exist, or files are missing and
    ``allow_download`` is false), GatedRepoAccessError (licence not accepted / no or bad token) or
    DownloadError (no connection, offline mode, repo not found, interrupted download).
    """
    models_dir = _as_dir(models_dir)
    found, notes = _search(explicit, models_dir, use_lora, strict=True)
    wanted = [c for c in COMPONENTS if c != "lora" or use_lora]
    missing = [c for c in wanted if found[c] is None]
    if missing:
        if not allow_download:
            raise _missing_error(missing, notes, models_dir)
        found.update(_download(missing, models_dir, _clean_token(token), progress, endpoint))
    return ModelPaths(**{c: found[c] for c in COMPONENTS})  # type: ignore[arg-type]


def download_models(
    models_dir: Path | str | None = None,
    token: str | None = None,
    progress: ProgressCallback | None = None,
    use_lora: bool = True,
    endpoint: str | None = None,
) -> ModelPaths:
    """Make every component available: what is already in ``models_dir`` or the Hugging Face cache is
    kept as it is, the rest is downloaded into ``models_dir`` (else into the cache)."""
    return resolve_model_paths(
        None,
        models_dir,
        allow_download=True,
        token=token,
        progress=progress,
        use_lora=use_lora,
        endpoint=endpoint,
    )


# --------------------------------------------------------------------------------------------------
# Local search


def _search(
    explicit: dict[str, Path | str | None] | None,
    models_dir: Path | str | None,
    use_lora: bool,
    strict: bool,
) -> tuple[dict[str, Path | None], dict[str, list[str]]]:
    explicit = dict(explicit or {})
    unknown = sorted(set(explicit) - set(COMPONENTS))
    if unknown:
        raise BadParametersError(
            f"Unknown model component(s) {', '.join(unknown)}.",
            f"Use only these names: {', '.join(COMPONENTS)}.",
        )
    models_dir = _as_dir(models_dir)
    found: dict[str, Path | None] = {c: None for c in COMPONENTS}
    notes: dict[str, list[str]] = {c: [] for c in COMPONENTS}
    for component in COMPONENTS:
        if component == "lora" and not use_lora:
            continue
        value = explicit.get(component)
        if value is not None and str(value).strip():
            found[component] = _explicit_path(component, value, strict, notes[component])
            continue
        if models_dir is not None:
            root = models_dir / (LORA_DIR if component == "lora" else FLUX_DIR)
            path, problem = _component_in_root(component, root)
            if path is not None:
                found[component] = path
                continue
            notes[component].append(f"models folder {root}: {problem}")
        repo = LORA_REPO if component == "lora" else FLUX_REPO
        snapshot = _cache_snapshot(repo, _PATTERNS[component])
        if snapshot is not None:
            path, problem = _component_in_root(component, snapshot)
            if path is not None:
                found[component] = path
                continue
            notes[component].append(f"Hugging Face cache {snapshot}: {problem}")
        else:
            notes[component].append(f"Hugging Face cache {_hf_cache_dir()}: not downloaded")
    return found, notes


def _explicit_path(component: str, value: Path | str, strict: bool, notes: list[str]) -> Path | None:
    path = Path(value).expanduser()
    if not path.exists():
        problem = "does not exist"
    elif component == "lora" and path.is_dir():
        lora, why = _component_in_root("lora", path)
        if lora is not None:
            return lora
        problem = f"is a folder with no usable LoRA in it ({why})"
    else:
        return path
    notes.append(f"path set for {component} {path}: {problem}")
    if strict:
        raise WeightsMissingError(
            f"The path set for the {component}, {path}, {problem}.",
            "Fix the path, or clear it to use the models folder / Hugging Face cache "
            f"(and {_DOWNLOAD_HOW} if the files are not there yet).",
        )
    return None


def _component_in_root(component: str, root: Path) -> tuple[Path | None, str]:
    """(path, "") when ``component`` is complete under ``root`` (a repo-layout folder), else (None, why)."""
    if not root.is_dir():
        return None, "no such folder"
    if component in ("transformer", "vae"):
        path = root / _PATTERNS[component][0]
        problem = _safetensors_problem(path)
        return (path, "") if problem is None else (None, f"{path.name} {problem}")
    if component == "lora":
        return _lora_in(root)
    folder = root / component
    if not folder.is_dir():
        return None, f"no {component}/ folder"
    if component in ("text_encoder", "text_encoder_2"):
        problem = _weights_folder_problem(folder)
    elif component == "tokenizer":
        ok = (folder / "tokenizer.json").is_file() or (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        )
        problem = None if ok else "has neither tokenizer.json nor vocab.json + merges.txt"
    else:  # tokenizer_2
        ok = (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()
        problem = None if ok else "has neither tokenizer.json nor spiece.model"
    return (folder, "") if problem is None else (None, f"{component}/ {problem}")


def _weights_folder_problem(folder: Path) -> str | None:
    if not (folder / "config.json").is_file():
        return "has no config.json"
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
            shards = sorted({str(v) for v in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"has an unreadable {indexes[0].name}"
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            return "has no .safetensors weights"
        for f in files:  # shards without their index: all N of "name-0000i-of-0000N" must be there
            m = _SHARD_RE.match(f.name)
            if m:
                width, count = len(m["i"]), int(m["n"])
                for i in range(1, count + 1):
                    shard = f"{m['stem']}-{i:0{width}d}-of-{m['n']}.safetensors"
                    if not (folder / shard).is_file():
                        return f"{shard} is missing"
    for f in files:
        problem = _safetensors_problem(f)
        if problem is not None:
            return f"{f.name} {problem}"
    return None


def _lora_in(folder: Path) -> tuple[Path | None, str]:
    names = [
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*.safetensors")
        if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    name = _pick_lora(names)
    if name is None:
        return None, "no LoRA .safetensors file"
    problem = _safetensors_problem(folder / name)
    return (folder / name, "") if problem is None else (None, f"{name} {problem}")


def _pick_lora(names: Iterable[str]) -> str | None:
    """The LoRA among a repo's / folder's files: top level first, then the usual adapter names."""

    def rank(name: str) -> tuple[int, int, str]:
        base = name.rsplit("/", 1)[-1].lower()
        if base == "adapter_model.safetensors":
            kind = 0
        elif base == "pytorch_lora_weights.safetensors":
            kind = 1
        elif "lora" in base or "dit360" in base:
            kind = 2
        else:
            kind = 3
        return (name.count("/"), kind, name)

    candidates = [n for n in names if n.lower().endswith(".safetensors")]
    return min(candidates, key=rank) if candidates else None


def _safetensors_problem(path: Path) -> str | None:
    """None when ``path`` is a complete safetensors file, else what is wrong with it.

    Only the header is read: a file shorter than its header says is a copy or download that
    stopped part-way.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"is truncated ({size} bytes)"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > 100_000_000 or 8 + header_len > size:
                return f"is truncated ({size} bytes)"
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except ValueError:
        return "is not a safetensors file"
    if not isinstance(header, dict):
        return "is not a safetensors file"
    try:
        data_end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (KeyError, TypeError, IndexError, ValueError):
        return "is not a safetensors file"
    expected = 8 + header_len + data_end
    if size < expected:
        return f"is incomplete ({size} of {expected} bytes: the download or copy stopped part-way)"
    return None


def _cache_snapshot(repo_id: str, patterns: Iterable[str]) -> Path | None:
    """The cached snapshot folder of ``repo_id`` (main), without any network access; None if none."""
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    incomplete = getattr(hf_errors, "IncompleteSnapshotError", None)
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=list(patterns)))
    except Exception as exc:  # noqa: BLE001 - any failure here just means "not in the cache"
        if incomplete is not None and isinstance(exc, incomplete) and getattr(exc, "snapshot_path", None):
            return Path(exc.snapshot_path)  # our own check decides what is usable in it
        if not isinstance(exc, (hf_errors.LocalEntryNotFoundError, OSError, ValueError)):
            logger.debug("Hugging Face cache lookup for %s failed: %s", repo_id, type(exc).__name__)
        return None


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return os.environ.get("HF_HUB_CACHE") or "~/.cache/huggingface/hub"


# --------------------------------------------------------------------------------------------------
# Download


def _download(
    missing: list[str],
    models_dir: Path | None,
    token: str | None,
    progress: ProgressCallback | None,
    endpoint: str | None,
) -> dict[str, Path]:
    try:
        from huggingface_hub import HfApi, constants, hf_hub_download
    except ImportError:
        raise DownloadError(
            "Cannot download the models: the huggingface_hub package is not installed in the worker's Python.",
            "Reinstall the worker environment (pip install huggingface_hub), or copy the files by hand:\n"
            + _placement(missing, models_dir),
        ) from None

    if constants.is_offline_mode():
        raise _offline_error(missing, models_dir, "offline mode is on (HF_HUB_OFFLINE is set)")

    groups = [
        (FLUX_REPO, [c for c in missing if c != "lora"]),
        (LORA_REPO, [c for c in missing if c == "lora"]),
    ]
    result: dict[str, Path] = {}
    for repo_id, components in groups:
        if not components:
            continue
        todo = [c for c in missing if c not in result]  # what a manual copy would still need
        api = HfApi(endpoint=endpoint, token=token)
        info = _hub_call(
            partial(api.model_info, repo_id, revision="main"),
            _Ctx(repo_id, f"the {', '.join(components)}", todo, models_dir, token),
        )
        names = [s.rfilename for s in (info.siblings or [])]
        files = _files_to_download(repo_id, components, names, models_dir)
        local_dir = None
        if models_dir is not None:
            local_dir = models_dir / (LORA_DIR if repo_id == LORA_REPO else FLUX_DIR)
        logger.info(
            "Downloading %d file(s) of %s (%s) into %s",
            sum(len(v) for v in files.values()),
            repo_id,
            ", ".join(components),
            local_dir or _hf_cache_dir(),
        )
        for component in components:
            todo = [c for c in missing if c not in result]
            root: Path | None = None
            for filename in files[component]:
                bar = _progress_bar_class(filename, progress)
                local = _hub_call(
                    partial(
                        hf_hub_download,
                        repo_id,
                        filename,
                        revision="main",
                        local_dir=local_dir,
                        token=token,
                        endpoint=endpoint,
                        tqdm_class=bar,
                    ),
                    _Ctx(repo_id, f"{filename} (for the {component})", todo, models_dir, token),
                )
                local_path = Path(local)
                if progress is not None and not bar.reported:  # already there: nothing was transferred
                    size = local_path.stat().st_size
                    progress(filename, size, size)
                if root is None:
                    root = local_path
                    for _ in filename.split("/"):
                        root = root.parent
            assert root is not None
            path, problem = _component_in_root(component, root)
            if path is None:
                raise DownloadError(
                    f"Downloaded the {component} from {repo_id} but it is not usable: {problem}.",
                    "Delete that file and download again; if it keeps happening the repository layout "
                    "changed: copy the files by hand:\n" + _placement([component], models_dir),
                )
            result[component] = path
    return result


def _files_to_download(
    repo_id: str, components: list[str], names: list[str], models_dir: Path | None
) -> dict[str, list[str]]:
    files: dict[str, list[str]] = {}
    for component in components:
        if component == "lora":
            lora = _pick_lora(n for n in names if fnmatch.fnmatchcase(n, "*.safetensors"))
            chosen = [] if lora is None else [lora]
            if lora is not None:
                config = (lora.rsplit("/", 1)[0] + "/" if "/" in lora else "") + "adapter_config.json"
                if config in names:
                    chosen.append(config)
        else:
            chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in _PATTERNS[component])]
            # small files (config, shard index) first: a folder cut short then still shows what it lacks
            chosen.sort(key=lambda n: (n.endswith(".safetensors"), n))
        if not chosen:
            raise DownloadError(
                f"The Hub repository {repo_id} has no file for the {component} "
                f"(looked for {', '.join(_PATTERNS[component])}).",
                "The repository layout may have changed; copy the files by hand:\n"
                + _placement([component], models_dir),
            )
        files[component] = chosen
    return files


def _progress_bar_class(filename: str, callback: ProgressCallback | None) -> type:
    """A tqdm look-alike that huggingface_hub drives for one file and that reports to ``callback``.

    It is not a tqdm subclass, so huggingface_hub instantiates it with only the bar's arguments
    (desc, total, initial, unit, ...); having ``update_transfer`` makes Xet downloads use this single
    bar for both their transfer and reconstruction counts (only the latter, bytes written, is reported).
    """

    class _Bar:
        reported = False

        def __init__(self, *args, total=None, initial=0, **kwargs) -> None:
            self.total = total
            self.n = initial or 0
            self.disable = False
            self._report()

        def _report(self) -> None:
            type(self).reported = True
            if callback is not None:
                callback(filename, int(self.n), int(self.total or 0))

        def update(self, n: int | float | None = 1) -> None:
            if n:
                self.n += n
                self._report()

        def update_transfer(self, n: int | float | None = 1) -> None:
            pass

        def set_postfix_str(self, *args, **kwargs) -> None:
            pass

        set_transfer_postfix_str = set_postfix_str
        set_description = set_postfix_str
        set_description_str = set_postfix_str
        set_postfix = set_postfix_str

        def refresh(self, *args, **kwargs) -> None:
            pass

        def close(self) -> None:
            pass

        @property
        def format_dict(self) -> dict:
            return {"rate": None, "n": self.n, "total": self.total}

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *exc) -> None:
            self.close()

    return _Bar


# --------------------------------------------------------------------------------------------------
# Errors


@dataclass
class _Ctx:
    """What a Hub call was for, to word its errors."""

    repo_id: str
    what: str  # "the transformer, vae" / "ae.safetensors (for the vae)"
    todo: list[str]  # components still missing, listed for copying by hand
    models_dir: Path | None
    token: str | None


def _hub_call(fn: Callable, ctx: _Ctx):
    """Run a huggingface_hub call, turning its failures into our errors.

    The translated error is raised outside the ``except`` block so that it carries no reference to
    the original exception (whose request object holds the Authorization header).
    """
    error: DiT360Error | None = None
    try:
        return fn()
    except Exception as exc:  # unknown ones (e.g. raised by the progress callback) are re-raised as they are
        error = _translate(exc, ctx)
        if error is None:
            raise
    raise error


def _translate(exc: BaseException, ctx: _Ctx) -> DiT360Error | None:
    from huggingface_hub import errors as hf_errors

    try:
        import httpx2

        transport_errors: tuple[type[BaseException], ...] = (httpx2.TransportError,)
    except ImportError:  # older huggingface_hub versions use requests
        transport_errors = ()

    detail = _scrub(f"{type(exc).__name__}: {exc}", ctx.token)
    logger.debug("Hub call for %s failed: %s", ctx.repo_id, detail)
    by_hand = _placement(ctx.todo, ctx.models_dir)

    if isinstance(exc, hf_errors.HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(exc, hf_errors.GatedRepoError) or status in (401, 403):
            why = {
                401: "no token was sent, or the token is invalid",
                403: "this token has not been granted access",
            }.get(status, "access is restricted")
            return GatedRepoAccessError(
                f"The Hugging Face Hub refused access to {ctx.repo_id} (HTTP {status}: {why}); "
                f"cannot download {ctx.what}.",
                _GATED_HINT,
            )
        if isinstance(exc, hf_errors.RepositoryNotFoundError):
            return DownloadError(
                f"The Hugging Face Hub says the repository {ctx.repo_id} does not exist "
                f"(needed for {ctx.what}).",
                "Check that HF_ENDPOINT (if set) points at the Hub, or copy the files by hand:\n" + by_hand,
            )
        if isinstance(exc, (hf_errors.RevisionNotFoundError, hf_errors.RemoteEntryNotFoundError)):
            return DownloadError(
                f"{ctx.what} is not on the Hub in {ctx.repo_id} ({_first_line(detail)}).",
                "The repository layout may have changed; copy the files by hand:\n" + by_hand,
            )
        return DownloadError(
            f"The Hugging Face Hub answered HTTP {status} while downloading {ctx.what} from {ctx.repo_id}.",
            "Retry later (files already downloaded are kept), or copy the files by hand:\n" + by_hand,
        )
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return _offline_error(ctx.todo, ctx.models_dir, "offline mode is on (HF_HUB_OFFLINE is set)")
    if isinstance(exc, (hf_errors.LocalEntryNotFoundError, ConnectionError, TimeoutError, *transport_errors)):
        return _offline_error(
            ctx.todo, ctx.models_dir, f"{ctx.repo_id} could not be reached: {_first_line(detail)}"
        )
    if isinstance(exc, OSError):
        return DownloadError(
            f"Downloading {ctx.what} from {ctx.repo_id} failed: {_first_line(detail)}",
            "Check free disk space and write permission where the files go, then retry "
            "(files already downloaded are kept).",
        )
    return None


def _offline_error(components: list[str], models_dir: Path | None, reason: str) -> DownloadError:
    return DownloadError(
        f"No connection to the Hugging Face Hub: {reason}. Cannot download the {', '.join(components)}.",
        "Connect to the internet and retry (files already downloaded are kept), or copy these files by "
        "hand:\n" + _placement(components, models_dir),
    )


def _missing_error(
    missing: list[str], notes: dict[str, list[str]], models_dir: Path | None
) -> WeightsMissingError:
    gb = sum(_APPROX_GB[c] for c in missing)
    lines = [f"Model files missing: {', '.join(missing)} (about {gb:.1f} GB to download)."]
    for c in missing:
        repo = LORA_REPO if c == "lora" else FLUX_REPO
        if c == "lora":
            what = "the LoRA .safetensors (+ adapter_config.json)"
        elif c in ("transformer", "vae"):
            what = _KNOWN_FILES[c][0]
        else:
            what = f"{c}/ ({', '.join(f.split('/')[-1] for f in _KNOWN_FILES[c])})"
        lines.append(f"  {c}: {what} from {repo}")
        for note in notes.get(c, []):
            lines.append(f"      looked in {note}")
    hint = (
        f"To download them, {_DOWNLOAD_HOW}"
        + (
            f" (FLUX.1-dev is gated: accept its licence at {FLUX_LICENSE_URL} and set a read token "
            f"from {TOKENS_URL} first)"
            if any(c != "lora" for c in missing)
            else ""
        )
        + ". Or copy the files by hand:\n"
        + _placement(missing, models_dir)
    )
    return WeightsMissingError("\n".join(lines), hint)


def _placement(components: Iterable[str], models_dir: Path | None) -> str:
    """Which file goes where, for copying by hand."""
    base = str(models_dir) if models_dir is not None else "<models folder>"
    lines = []
    for c in components:
        if c == "lora":
            lines.append(
                f"    {os.path.join(base, LORA_DIR, 'adapter_model.safetensors')}  <- the LoRA .safetensors of "
                f"https://huggingface.co/{LORA_REPO} (keep its name; adapter_config.json beside it if the repo "
                "has one)"
            )
            continue
        for f in _KNOWN_FILES[c]:
            lines.append(
                f"    {os.path.join(base, FLUX_DIR, *f.split('/'))}  <- {FLUX_LICENSE_URL}/resolve/main/{f}"
            )
    if models_dir is None:
        lines.append("    and set that folder as the models folder (add-on Preferences, or `--models-dir`).")
    return "\n".join(lines)


def _as_dir(value: Path | str | None) -> Path | None:
    """A models folder setting; an empty one (e.g. a blank preference) means none."""
    if value is None or not str(value).strip():
        return None
    return Path(value).expanduser()


def _clean_token(token: str | None) -> str | None:
    if token is None:
        return None
    token = token.strip()
    return token or None


def _scrub(text: str, token: str | None) -> str:
    for secret in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if secret and secret.strip():
            text = text.replace(secret.strip(), "***")
    return text


def _first_line(text: str, limit: int = 300) -> str:
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."
