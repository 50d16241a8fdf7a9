"""Small helpers every Blender-side module uses: the add-on's name, its folders, its preferences."""

from __future__ import annotations

import re
from pathlib import Path

import bpy

# Inside Blender this is "bl_ext.<repo>.dit360_blender"; preferences and user folders are keyed by it.
ADDON_PACKAGE = __package__.rsplit(".", 1)[0]
# The package folder (the extension's top folder in an installed zip, dit360_blender/ in a checkout).
PACKAGE_DIR = Path(__file__).resolve().parent.parent

FLUX_LICENSE_URL = "https://huggingface.co/black-forest-labs/FLUX.1-dev"
TOKENS_URL = "https://huggingface.co/settings/tokens"


def prefs() -> bpy.types.AddonPreferences | None:
    """The add-on's preferences, or None while it is not enabled (e.g. during unregister)."""
    addon = bpy.context.preferences.addons.get(ADDON_PACKAGE)
    return addon.preferences if addon is not None else None


def user_dir(sub: str, create: bool = True) -> Path:
    """A folder of ours that survives upgrades: Blender's per-extension user folder.

    Loaded without the extension system (a plain `import`, as some scripts do) Blender refuses
    `extension_path_user`; then a folder under Blender's user data is used instead.
    """
    try:
        path = Path(bpy.utils.extension_path_user(ADDON_PACKAGE, path=sub, create=create))
    except ValueError:
        path = Path(bpy.utils.user_resource("DATAFILES", path=f"dit360_blender/{sub}", create=create))
    return path


def vendor_setup_script() -> Path | None:
    """vendor_setup.py: beside the add-on's __init__ in the built zip, at the repo root in a checkout."""
    for candidate in (PACKAGE_DIR / "vendor_setup.py", PACKAGE_DIR.parent / "vendor_setup.py"):
        if candidate.is_file():
            return candidate
    return None


def tag_redraw() -> None:
    """Redraw the areas that show our state (sidebar, properties, preferences)."""
    wm = bpy.context.window_manager
    if wm is None:
        return
    for window in wm.windows:
        screen = window.screen
        if screen is None:
            continue
        for area in screen.areas:
            if area.type in {"VIEW_3D", "PROPERTIES", "PREFERENCES"}:
                area.tag_redraw()


def runtime() -> bpy.types.PropertyGroup | None:
    """The window-manager state (progress, status, errors): never saved in the .blend."""
    wm = bpy.context.window_manager
    return getattr(wm, "dit360", None) if wm is not None else None


def short(text: str, limit: int = 160) -> str:
    """One line for a label: Blender's labels do not wrap."""
    line = re.sub(r"\s+", " ", text or "").strip()
    return line if len(line) <= limit else line[: limit - 1] + "…"
