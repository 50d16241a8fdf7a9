"""The Edit sub-panel (3D Viewport ▸ Sidebar ▸ DiT360 ▸ Edit World): prompt, strength, feather and
the four edits (edit_ops.py)."""

from __future__ import annotations

from pathlib import Path

import bpy

from .edit_ops import parent_entry, world_mask


class DIT360_PT_edit(bpy.types.Panel):
    bl_label = "Edit World"
    bl_idname = "DIT360_PT_edit"
    bl_parent_id = "DIT360_PT_main"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "DiT360"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        e = context.scene.dit360_edit
        layout.prop(e, "prompt", text="Prompt")
        row = layout.row(align=True)
        row.prop(e, "strength")
        row.prop(e, "feather")
        box = layout.box()
        box.prop(e, "use_viewport")
        box.operator("dit360.regenerate_view", icon="CAMERA_DATA")
        box = layout.box()
        row = box.row(align=True)
        row.operator("dit360.paint_mask", icon="BRUSH_DATA")
        sub = row.row(align=True)
        sub.enabled = world_mask(context.scene.world) is not None
        sub.operator("dit360.regenerate_masked", icon="MOD_MASK")
        box = layout.box()
        box.prop(e, "photo")
        row = box.row(align=True)
        row.prop(e, "photo_hfov")
        row.prop(e, "yaw")
        row.prop(e, "pitch")
        box.operator("dit360.photo_to_panorama", icon="IMAGE_DATA")
        box = layout.box()
        box.prop(e, "band")
        box.operator("dit360.repair_seam", icon="MOD_MIRROR")
        draw_lineage(layout, context)


def draw_lineage(layout: bpy.types.UILayout, context: bpy.types.Context) -> None:
    """The selected History entry's place in the edit tree: what it was made from."""
    settings = context.scene.dit360
    if not 0 <= settings.history_index < len(settings.history):
        return
    entry = settings.history[settings.history_index]
    kind = getattr(entry, "edit_kind", "")
    if not kind:
        return
    parent = parent_entry(context.scene, entry)
    source = parent.name if parent is not None else Path(entry.parent).name
    layout.label(text=f"{entry.name}: {kind} edit of {source}", icon="LINKED")


CLASSES = (DIT360_PT_edit,)
