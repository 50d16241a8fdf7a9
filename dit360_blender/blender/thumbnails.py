"""The add-on's thumbnail collection (`bpy.utils.previews`): the live preview and the history
images in the panels. One module object owns it; `register()` opens it, `unregister()` closes it.
"""

from __future__ import annotations

from pathlib import Path

import bpy


class Thumbnails:
    def __init__(self) -> None:
        self.collection = None  # a bpy.utils.previews collection while the add-on is registered

    def open(self) -> None:
        import bpy.utils.previews

        self.collection = bpy.utils.previews.new()

    def close(self) -> None:
        if self.collection is not None:
            bpy.utils.previews.remove(self.collection)
            self.collection = None

    def load(self, key: str, path: Path | str) -> int:
        """icon_id of the file's thumbnail under `key` (loaded once), 0 when closed or no file."""
        if self.collection is None:
            return 0
        if key not in self.collection:
            if not Path(path).is_file():
                return 0
            self.collection.load(key, str(path), "IMAGE")
        return self.collection[key].icon_id

    def drop(self, key: str | None) -> None:
        if self.collection is not None and key and key in self.collection:
            del self.collection[key]


THUMBNAILS = Thumbnails()
