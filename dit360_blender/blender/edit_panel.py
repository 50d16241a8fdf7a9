"""The Edit sub-panel (3D Viewport ▸ Sidebar ▸ DiT360 ▸ Edit World): prompt, strength, feather and
the four edits (edit_ops.py)."""

from __future__ import annotations

import bpy

from .edit_ops import world_mask


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


CLASSES = (DIT360_PT_edit,)
