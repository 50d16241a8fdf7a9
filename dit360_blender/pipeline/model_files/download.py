"""Getting the model files: find what is here, download exactly the missing files from the Hub.

The token is the ``token`` argument, else whatever huggingface_hub finds (``HF_TOKEN``, then the token
saved by ``hf auth login``). It is never logged nor put in any message.

Note on resuming (huggingface_hub 1.x/2.x): a connection dropped mid-file is resumed within the same
call (an HTTP ``Range`` request, up to 5 times). A file whose download was stopped (process killed,
error) starts again from zero next time; files already complete are kept and not fetched again.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ..errors import DownloadError
from .catalogue import COMPONENTS, FLUX_REPO, LORA_REPO, PATTERNS, ModelPaths, folder_of, pick_lora, placement
from .hub_errors import HubCall, hub_call, offline_error
from .local_search import as_models_dir, component_in_root, hf_cache_dir, missing_error, search

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]


def resolve_model_paths(
    explicit: dict[str, Path | str | None] | None = None,
    models_dir: Path | str | None = None,
    allow_download: bool = False,
    token: str | None = None,
    progress: ProgressCallback | None = None,
    use_lora: bool = True,
    endpoint: str | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> ModelPaths:
    """Find every component (explicit path, then ``models_dir``, then the Hugging Face cache) and,
    when ``allow_download`` is true, download the missing ones.

    ``checkpoint()`` is called before each component is looked for; like ``progress``, an exception
    it raises (e.g. to cancel) propagates unchanged.

    ``progress(filename, bytes_done, bytes_total)`` is called while each repo file downloads
    (``filename`` relative to its repo; ``bytes_total`` is 0 when unknown). An exception raised by
    ``progress`` (e.g. to cancel) propagates unchanged. ``endpoint`` overrides the Hub URL
    (default: huggingface_hub's, i.e. ``HF_ENDPOINT`` or https://huggingface.co).

    Raises WeightsMissingError (an explicit path does not exist, or files are missing and
    ``allow_download`` is false), GatedRepoAccessError (licence not accepted / no or bad token) or
    DownloadError (no connection, offline mode, repo not found, interrupted download).
    """
    models_dir = as_models_dir(models_dir)
    found, notes = search(explicit, models_dir, use_lora, strict=True, checkpoint=checkpoint)
    wanted = [c for c in COMPONENTS if c != "lora" or use_lora]
    missing = [c for c in wanted if found[c] is None]
    if missing:
        if not allow_download:
            raise missing_error(missing, notes, models_dir)
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


def _download(
    missing: list[str],
    models_dir: Path | None,
    token: str | None,
    progress: ProgressCallback | None,
    endpoint: str | None,
) -> dict[str, Path]:
    """Download the ``missing`` components, repo by repo; returns where each one now is."""
    try:
        from huggingface_hub import HfApi, constants
    except ImportError:
        raise DownloadError(
            "Cannot download the models: the huggingface_hub package is not installed in the worker's Python.",
            "Reinstall the worker environment (pip install huggingface_hub), or copy the files by hand:\n"
            + placement(missing, models_dir),
        ) from None

    if constants.is_offline_mode():
        raise offline_error(missing, models_dir, "offline mode is on (HF_HUB_OFFLINE is set)")

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
        info = hub_call(
            partial(api.model_info, repo_id, revision="main"),
            HubCall(repo_id, f"the {', '.join(components)}", todo, models_dir, token),
        )
        names = [s.rfilename for s in (info.siblings or [])]
        files = _files_to_download(repo_id, components, names, models_dir)
        local_dir = models_dir / folder_of(components[0]) if models_dir is not None else None
        logger.info(
            "Downloading %d file(s) of %s (%s) into %s",
            sum(len(v) for v in files.values()),
            repo_id,
            ", ".join(components),
            local_dir or hf_cache_dir(),
        )
        for component in components:
            todo = [c for c in missing if c not in result]
            local = [
                _download_file(
                    repo_id,
                    filename,
                    local_dir,
                    progress,
                    HubCall(repo_id, f"{filename} (for the {component})", todo, models_dir, token),
                    endpoint,
                )
                for filename in files[component]
            ]
            root = local[0]
            for _ in files[component][0].split("/"):  # the snapshot (or models_dir) folder it went into
                root = root.parent
            path, problem = component_in_root(component, root)
            if path is None:
                raise DownloadError(
                    f"Downloaded the {component} from {repo_id} but it is not usable: {problem}.",
                    "Delete that file and download again; if it keeps happening the repository layout "
                    "changed: copy the files by hand:\n" + placement([component], models_dir),
                )
            result[component] = path
    return result


def _download_file(
    repo_id: str,
    filename: str,
    local_dir: Path | None,
    progress: ProgressCallback | None,
    ctx: HubCall,
    endpoint: str | None,
) -> Path:
    """One repo file into ``local_dir`` (or the cache), reporting its bytes to ``progress``."""
    from huggingface_hub import hf_hub_download

    bar = _progress_bar_class(filename, progress)
    local = hub_call(
        partial(
            hf_hub_download,
            repo_id,
            filename,
            revision="main",
            local_dir=local_dir,
            token=ctx.token,
            endpoint=endpoint,
            tqdm_class=bar,
        ),
        ctx,
    )
    local_path = Path(local)
    if progress is not None and not bar.reported:  # already there: nothing was transferred
        size = local_path.stat().st_size
        progress(filename, size, size)
    return local_path


def _files_to_download(
    repo_id: str, components: list[str], names: list[str], models_dir: Path | None
) -> dict[str, list[str]]:
    files: dict[str, list[str]] = {}
    for component in components:
        if component == "lora":
            lora = pick_lora(n for n in names if fnmatch.fnmatchcase(n, "*.safetensors"))
            chosen = [] if lora is None else [lora]
            if lora is not None:
                config = (lora.rsplit("/", 1)[0] + "/" if "/" in lora else "") + "adapter_config.json"
                if config in names:
                    chosen.append(config)
        else:
            chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in PATTERNS[component])]
            # small files (config, shard index) first: a folder cut short then still shows what it lacks
            chosen.sort(key=lambda n: (n.endswith(".safetensors"), n))
        if not chosen:
            raise DownloadError(
                f"The Hub repository {repo_id} has no file for the {component} "
                f"(looked for {', '.join(PATTERNS[component])}).",
                "The repository layout may have changed; copy the files by hand:\n"
                + placement([component], models_dir),
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


def _clean_token(token: str | None) -> str | None:
    if token is None:
        return None
    token = token.strip()
    return token or None
