"""Where the model files are on this machine: explicit paths, a models folder, the Hugging Face cache.

Nothing here touches the network; the cache is read by huggingface_hub with ``local_files_only``
(and skipped when huggingface_hub is not installed).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import BadParametersError, WeightsMissingError
from .catalogue import (
    APPROX_GB,
    COMPONENTS,
    DOWNLOAD_HOW,
    FLUX_LICENSE_URL,
    KNOWN_FILES,
    PATTERNS,
    TOKENS_URL,
    folder_of,
    pick_lora,
    placement,
    repo_of,
)
from .checkpoint_parts import checkpoint_parts
from .safetensors_header import safetensors_problem

logger = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")


def find_model_paths(
    explicit: dict[str, Path | str | None] | None = None,
    models_dir: Path | str | None = None,
    use_lora: bool = True,
) -> dict[str, Path | None]:
    """Search explicit paths, ``models_dir`` and the Hugging Face cache; never download, never raise
    for a missing file. Returns every component of ``COMPONENTS``, ``None`` where it is missing
    (``lora`` is ``None`` too when ``use_lora`` is false)."""
    found, _notes = search(explicit, models_dir, use_lora, strict=False)
    return found


def search(
    explicit: dict[str, Path | str | None] | None,
    models_dir: Path | str | None,
    use_lora: bool,
    strict: bool,
    checkpoint: Callable[[], None] | None = None,
) -> tuple[dict[str, Path | None], dict[str, list[str]]]:
    """(found, notes): each component's path or None, and per component where it was looked for in vain.

    ``strict`` makes an explicit path that does not exist an error instead of a note. ``checkpoint``
    is called before each component (a slow disk or a big cache makes the search take a while); an
    exception it raises, e.g. to cancel, propagates unchanged.
    """
    explicit = dict(explicit or {})
    unknown = sorted(set(explicit) - set(COMPONENTS))
    if unknown:
        raise BadParametersError(
            f"Unknown model component(s) {', '.join(unknown)}.",
            f"Use only these names: {', '.join(COMPONENTS)}.",
        )
    models_dir = as_models_dir(models_dir)
    found: dict[str, Path | None] = {c: None for c in COMPONENTS}
    notes: dict[str, list[str]] = {c: [] for c in COMPONENTS}
    for component in COMPONENTS:
        if component == "lora" and not use_lora:
            continue
        if checkpoint is not None:
            checkpoint()
        value = explicit.get(component)
        if value is not None and str(value).strip():
            found[component] = _explicit_path(component, value, strict, notes[component])
            continue
        if component != "transformer" and _from_checkpoint(component, found["transformer"], notes):
            found[component] = found["transformer"]
            continue
        if models_dir is not None:
            root = models_dir / folder_of(component)
            path, problem = component_in_root(component, root)
            if path is not None:
                found[component] = path
                continue
            notes[component].append(f"models folder {root}: {problem}")
        repo = repo_of(component)
        snapshot = _cache_snapshot(repo, PATTERNS[component])
        if snapshot is not None:
            path, problem = component_in_root(component, snapshot)
            if path is not None:
                found[component] = path
                continue
            notes[component].append(f"Hugging Face cache {snapshot}: {problem}")
        else:
            notes[component].append(f"Hugging Face cache {hf_cache_dir()}: not downloaded")
    return found, notes


_HELD_BY = {"vae": "vae", "text_encoder": "clip_l", "text_encoder_2": "t5xxl"}  # component -> part


def _from_checkpoint(component: str, transformer: Path | None, notes: dict[str, list[str]]) -> bool:
    """True when the transformer's file is an all-in-one checkpoint that holds ``component``.

    Its VAE and text encoders are used; the tokenizers never are in such a file. What is not in it
    is noted, so a message about the parts still missing explains itself.
    """
    parts = checkpoint_parts(transformer) if transformer is not None else None
    if parts is None or not parts.all_in_one:
        return False
    if component in _HELD_BY and getattr(parts, _HELD_BY[component]):
        return True
    if component != "lora":
        notes[component].append(
            f"the all-in-one checkpoint {transformer} (it holds {parts.described()}; not the {component})"
        )
    return False


def _explicit_path(component: str, value: Path | str, strict: bool, notes: list[str]) -> Path | None:
    path = Path(value).expanduser()
    if not path.exists():
        problem = "does not exist"
    elif component == "lora" and path.is_dir():
        lora, why = component_in_root("lora", path)
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
            f"(and {DOWNLOAD_HOW} if the files are not there yet).",
        )
    return None


def component_in_root(component: str, root: Path) -> tuple[Path | None, str]:
    """(path, "") when ``component`` is complete under ``root`` (a repo-layout folder), else (None, why)."""
    if not root.is_dir():
        return None, "no such folder"
    if component in ("transformer", "vae"):
        return _single_file_or_diffusers_folder(component, root)
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


def _single_file_or_diffusers_folder(component: str, root: Path) -> tuple[Path | None, str]:
    """BFL's single file (flux1-dev.safetensors / ae.safetensors), else the diffusers folder of the
    same weights (transformer/ / vae/), which a Hub cache filled by diffusers holds instead."""
    path = root / PATTERNS[component][0]
    problem = _problem_text(path)
    if problem is None:
        return path, ""
    folder = root / component
    if not folder.is_dir():
        return None, f"{path.name} {problem}, and there is no diffusers {component}/ folder"
    folder_problem = _weights_folder_problem(folder)
    if folder_problem is None:
        return folder, ""
    return None, f"{path.name} {problem}, and the diffusers {component}/ folder {folder_problem}"


def _weights_folder_problem(folder: Path) -> str | None:
    """None when a transformers/diffusers model folder has its config and every weight shard, complete."""
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
        problem = _problem_text(f)
        if problem is not None:
            return f"{f.name} {problem}"
    return None


def _lora_in(folder: Path) -> tuple[Path | None, str]:
    """(the LoRA file under ``folder``, "") or (None, why), hidden folders (like .cache) skipped."""
    names = [
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*.safetensors")
        if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    name = pick_lora(names)
    if name is None:
        return None, "no LoRA .safetensors file"
    problem = _problem_text(folder / name)
    return (folder / name, "") if problem is None else (None, f"{name} {problem}")


def _problem_text(path: Path) -> str | None:
    """What makes ``path`` unusable as a weights file, worded to follow its name; None when it is fine."""
    problem = safetensors_problem(path)
    return None if problem is None else problem.text


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


def hf_cache_dir() -> str:
    """The Hugging Face cache folder, for messages (huggingface_hub's own idea of it when installed)."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return os.environ.get("HF_HUB_CACHE") or "~/.cache/huggingface/hub"


def missing_error(
    missing: list[str], notes: dict[str, list[str]], models_dir: Path | None
) -> WeightsMissingError:
    """The error for components that are nowhere and may not be downloaded: what, where we looked, how to get them."""
    gb = sum(APPROX_GB[c] for c in missing)
    lines = [f"Model files missing: {', '.join(missing)} (about {gb:.1f} GB to download)."]
    for c in missing:
        repo = repo_of(c)
        if c == "lora":
            what = "the LoRA .safetensors (+ adapter_config.json)"
        elif c in ("transformer", "vae"):
            what = KNOWN_FILES[c][0]
        else:
            what = f"{c}/ ({', '.join(f.split('/')[-1] for f in KNOWN_FILES[c])})"
        lines.append(f"  {c}: {what} from {repo}")
        for note in notes.get(c, []):
            lines.append(f"      looked in {note}")
    hint = (
        f"To download them, {DOWNLOAD_HOW}"
        + (
            f" (FLUX.1-dev is gated: accept its licence at {FLUX_LICENSE_URL} and set a read token "
            f"from {TOKENS_URL} first)"
            if any(c != "lora" for c in missing)
            else ""
        )
        + ". Or copy the files by hand:\n"
        + placement(missing, models_dir)
    )
    return WeightsMissingError("\n".join(lines), hint)


def as_models_dir(value: Path | str | None) -> Path | None:
    """A models folder setting; an empty one (e.g. a blank preference) means none."""
    if value is None or not str(value).strip():
        return None
    return Path(value).expanduser()
