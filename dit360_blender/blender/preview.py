"""A job's preview World: while a job runs, its scene shows the previews in a copy of its World (or a
new one) and the user's World waits, untouched, until the result goes into it.

Every datablock is found by `session_uid`, which stays the same across renames and undo steps (a
name changes with a rename, and undo replaces the Python objects): renaming either World mid-job
changes nothing. While it waits the user's World may have no user left, and Blender saves no
datablock without one, so it gets a fake user for the length of the job; and for the length of
every save the scenes get their World back and the preview World is left with no user: the file on
disk holds the user's World, never the preview (pump.before_save / after_save call this).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import bpy

from . import world as world_nodes

PREVIEW_IMAGE = "DiT360 Preview"
PREVIEW_WORLD = "DiT360 Preview World"


def by_uid(collection: bpy.types.bpy_prop_collection, uid: int | None) -> bpy.types.ID | None:
    """The datablock of `collection` with this session_uid, or None (deleted, or undone)."""
    if uid is None:
        return None
    return next((item for item in collection if item.session_uid == uid), None)


@dataclass
class PreviewWorld:
    scene_uid: int
    user_world_uid: int | None  # the user's World when the job started (None: the scene had none)
    preview_world_uid: int | None = None
    image_uid: int | None = None
    file: Path | None = None
    fake_user: bool | None = None  # the user's World's own use_fake_user (None: not touched)
    _saved: list[int] = field(default_factory=list)  # scenes given their World back for a save

    @classmethod
    def of(cls, scene: bpy.types.Scene) -> PreviewWorld:
        return cls(scene.session_uid, scene.world.session_uid if scene.world is not None else None)

    def scene(self) -> bpy.types.Scene:
        return by_uid(bpy.data.scenes, self.scene_uid) or bpy.context.scene

    def user_world(self) -> bpy.types.World | None:
        return by_uid(bpy.data.worlds, self.user_world_uid)

    def world(self) -> bpy.types.World | None:
        return by_uid(bpy.data.worlds, self.preview_world_uid)

    def show(self, path: Path) -> None:
        """Show the preview file `path` in the preview World (made on the first preview)."""
        if self.file is not None and self.file != path:
            self.file.unlink(missing_ok=True)
        self.file = path
        image = by_uid(bpy.data.images, self.image_uid)
        if image is None:
            image = bpy.data.images.load(str(path), check_existing=False)
            image.name = PREVIEW_IMAGE
            self.image_uid = image.session_uid
        else:
            image.filepath = str(path)
            image.reload()
        preview = self.world()
        if preview is None:
            original = self.user_world()
            preview = original.copy() if original is not None else bpy.data.worlds.new(PREVIEW_WORLD)
            preview.name = PREVIEW_WORLD
            self.preview_world_uid = preview.session_uid
        self._guard()
        scene = self.scene()
        if scene.world != preview:
            scene.world = preview
        world_nodes.set_image(preview, image)

    def _guard(self) -> None:
        """A fake user keeps the user's World through any save, autosave or crash (set again after
        an undo took it back)."""
        user = self.user_world()
        if user is None:
            return
        if self.fake_user is None:
            self.fake_user = user.use_fake_user
        if not user.use_fake_user:
            user.use_fake_user = True

    def drop(self, restore_world: bool) -> None:
        """Give the scene its World back (when `restore_world`), delete the preview World, image and
        file, and take our fake user off the user's World."""
        scene = self.scene()
        preview = self.world()
        if preview is not None:
            if restore_world and scene.world == preview:
                scene.world = self.user_world()
            bpy.data.worlds.remove(preview)
        image = by_uid(bpy.data.images, self.image_uid)
        if image is not None:
            bpy.data.images.remove(image)
        if self.file is not None:
            self.file.unlink(missing_ok=True)
        user = self.user_world()
        if user is not None and self.fake_user is not None:
            user.use_fake_user = self.fake_user
        self.preview_world_uid = self.image_uid = self.file = self.fake_user = None

    def before_save(self) -> None:
        """The scenes showing the preview get the user's World back while the file is written; the
        preview World is left with no user (so it is not written), and its image out of it."""
        preview = self.world()
        if preview is None:
            return
        user = self.user_world()
        self._saved = []
        for scene in bpy.data.scenes:
            if scene.world == preview:
                scene.world = user
                self._saved.append(scene.session_uid)
        if user is not None and self.fake_user is not None:
            user.use_fake_user = self.fake_user  # the file keeps the World as the user had it
        env = world_nodes.our_nodes(preview).get("env")
        if env is not None:
            env.image = None

    def after_save(self) -> None:
        """The previews go on where they were."""
        preview = self.world()
        if preview is None:
            return
        for uid in self._saved:
            scene = by_uid(bpy.data.scenes, uid)
            if scene is not None:
                scene.world = preview
        self._saved = []
        self._guard()
        image = by_uid(bpy.data.images, self.image_uid)
        if image is not None:
            world_nodes.set_image(preview, image)
