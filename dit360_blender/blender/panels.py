"""The sidebar panel (View3D ▸ Sidebar ▸ DiT360) and the World-properties panel.

Draw code never raises and never starts work: it reads state and offers buttons. Everything that
cannot work yet (no dependencies, no model files) says so with the button that fixes it.
"""

from __future__ import annotations

from pathlib import Path

import bpy

from . import history, lighting, paths, resolution, resolution_ui
from . import world as world_nodes
from .common import prefs, runtime
from .prefs import schedule_checks
from .pump import PUMP
from .thumbnails import THUMBNAILS

_FIX_BUTTONS = {
    "worker_start_failed": (
        ("dit360.install_dependencies", "IMPORT"),
        ("dit360.open_preferences", "PREFERENCES"),
    ),
    "weights_missing": (("dit360.download_models", "IMPORT"), ("dit360.open_preferences", "PREFERENCES")),
    "bad_checkpoint": (("dit360.open_preferences", "PREFERENCES"),),
    "lora_mismatch": (("dit360.open_preferences", "PREFERENCES"),),
    "download_failed": (("dit360.open_preferences", "PREFERENCES"),),
    "download_gated": (("dit360.open_preferences", "PREFERENCES"),),
    "out_of_memory": (("dit360.open_preferences", "PREFERENCES"),),
    "device_unavailable": (("dit360.open_preferences", "PREFERENCES"),),
    "remote_unreachable": (("dit360.open_preferences", "PREFERENCES"),),  # Worker: Remote settings
    "unauthorized": (("dit360.open_preferences", "PREFERENCES"),),  # a remote worker's token file
    "worker_unresponsive": (("dit360.stop_worker", "X"),),  # the client stopped it; this makes sure
}


def _thumbnail(path: str) -> int:
    """icon_id of a file's thumbnail (loaded once into the add-on's preview collection), 0 if none."""
    pcoll = THUMBNAILS.collection
    if pcoll is None or not path:
        return 0
    path = paths.resolve(path)  # history paths may be relative to the .blend
    key = f"history:{path}"
    if key not in pcoll:
        if not Path(path).is_file():
            return 0
        pcoll.load(key, path, "IMAGE")
    return pcoll[key].icon_id


def _wrap(layout: bpy.types.UILayout, text: str, icon: str = "NONE", width: int = 48, lines: int = 8) -> None:
    """Labels do not wrap in Blender: cut the text into lines that fit a sidebar."""
    out: list[str] = []
    for paragraph in text.splitlines():
        words, line = paragraph.split(), ""
        for word in words:
            if line and len(line) + 1 + len(word) > width:
                out.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        out.append(line)
    col = layout.column(align=True)
    for i, line in enumerate(out[:lines]):
        col.label(text=line, icon=icon if i == 0 else "BLANK1")
    if len(out) > lines:
        col.label(text="… (the rest is in the worker log)", icon="BLANK1")


def draw_setup_hints(layout: bpy.types.UILayout) -> None:
    state = runtime()
    if state is None:
        return
    if state.deps_state == "UNKNOWN" or state.models_state == "UNKNOWN":
        schedule_checks()
    if state.deps_state in {"MISSING", "FAILED"}:
        box = layout.box()
        box.alert = True
        box.label(text="The worker's packages are missing.", icon="ERROR")
        if state.deps_summary:
            _wrap(box, state.deps_summary, lines=2)
        box.operator("dit360.open_preferences", text="Install Dependencies…", icon="PREFERENCES")
    elif state.deps_state == "INSTALLING":
        layout.label(text=f"Installing dependencies… {state.install_elapsed:.0f} s", icon="TIME")
    if state.models_state == "MISSING":
        box = layout.box()
        box.label(text="Model files are missing:", icon="ERROR")
        _wrap(box, state.models_missing, lines=2)
        row = box.row(align=True)
        row.operator("dit360.download_models", icon="IMPORT")
        row.operator("dit360.open_preferences", text="", icon="PREFERENCES")
    elif state.models_state == "DOWNLOADING":
        layout.label(text=state.download_status or "Downloading models…", icon="IMPORT")


def schedule_warm() -> None:
    """With the preference on, load the model for the panel's settings right after this draw (a
    draw must not start processes; PUMP.warm does it once per session per settings), once the
    worker's packages are known to be there and the model files not known to be missing."""
    state, preferences = runtime(), prefs()
    if state is None or preferences is None or not preferences.warm_on_open:
        return
    remote = preferences.worker_mode != "LOCAL"
    if (remote or state.deps_state == "OK") and state.models_state != "MISSING":
        if not bpy.app.timers.is_registered(_warm_after_draw):
            bpy.app.timers.register(_warm_after_draw, first_interval=0.0)


def _warm_after_draw() -> None:
    PUMP.warm(bpy.context.scene)


def draw_progress(layout: bpy.types.UILayout) -> None:
    state = runtime()
    if state is None:
        return
    if state.running:
        text = state.status
        if state.eta >= 0:
            text += f" · ETA {state.eta:.0f} s"
        layout.progress(factor=state.progress, type="BAR", text=text)
        if state.detail:
            layout.label(text=state.detail)
        if state.preview_icon:
            layout.template_icon(icon_value=state.preview_icon, scale=6.0)
    elif state.status:
        layout.label(text=state.status, icon="CHECKMARK" if state.stage == "done" else "INFO")
    if state.error_message:
        box = layout.box()
        col = box.column()
        col.alert = True
        _wrap(col, state.error_message, icon="ERROR", lines=5)
        if state.error_hint:
            _wrap(box, "Fix: " + state.error_hint, icon="INFO", lines=8)
        row = box.row(align=True)
        for idname, icon in _FIX_BUTTONS.get(state.error_code, ()):
            row.operator(idname, icon=icon)
        row.operator("dit360.clear_error", text="", icon="X")
        log = PUMP.link.client.log_path if PUMP.link.client is not None else None
        if log is not None and log.is_file():  # the whole story (a traceback, say) is one click away
            box.operator("wm.path_open", text="Open Worker Log", icon="TEXT").filepath = str(log)


def draw_environment_info(layout: bpy.types.UILayout, info: dict) -> None:
    """The current environment's seam score and sun (or why there is none), from its image."""
    col = layout.column(align=True)
    if info.get("seam"):
        col.label(text=info["seam"], icon="CHECKMARK" if info.get("seam_ok") else "ERROR")
    if info.get("sun"):
        if info.get("sun_found"):
            col.label(text=info["sun"], icon="LIGHT_SUN")
        else:
            _wrap(col, info["sun"], icon="INFO", lines=3)


def draw_world_controls(layout: bpy.types.UILayout, context: bpy.types.Context) -> None:
    scene = context.scene
    world = scene.world if scene is not None else None
    if world is None:
        layout.label(text="The scene has no World yet: Generate makes one.", icon="INFO")
    else:
        settings = world.dit360
        col = layout.column()
        col.enabled = world_nodes.has_chain(world)
        if not col.enabled:
            layout.label(text="No DiT360 environment in this World yet.", icon="INFO")
        info = lighting.describe_environment(world) if col.enabled else {"image": None}
        col.prop(settings, "rotation")
        col.prop(settings, "strength", text="Lighting Strength" if settings.split_camera else "Strength")
        if info.get("kind") in ("hdr", "lighting"):
            col.label(text=f"× exposure {info['exposure']:.3g} (grey card at 18 %)", icon="BLANK1")
        col.prop(settings, "split_camera")
        sub = col.column()
        sub.enabled = settings.split_camera
        sub.prop(settings, "camera_strength")
        sun = col.column()
        sun.enabled = bool(info.get("has_lamp"))
        sun.prop(settings, "use_sun")
        if not settings.use_sun and info.get("kind") == "lighting":  # lighting.refresh kept the lamp
            sun.label(text="The HDR with the sun in it is missing: the sun stays a lamp.", icon="INFO")
        row = sun.row()
        row.enabled = settings.use_sun
        row.prop(settings, "sun_strength")
        if scene is not None:
            col.prop(scene.dit360, "sun_share", text="Sun Share (next world)")
        if info.get("image"):
            layout.label(text=info["image"], icon="IMAGE_RGB_ALPHA" if info.get("is_float") else "IMAGE_DATA")
            draw_environment_info(layout, info)
    row = layout.row(align=True)
    row.operator("dit360.preview_lighting", text="Preview Lighting", icon="MATERIAL").mode = "MATERIAL"
    row.operator("dit360.preview_lighting", text="Rendered", icon="SHADING_RENDERED").mode = "RENDERED"


class DIT360_UL_history(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index=0):  # noqa: D102
        icon_id = _thumbnail(item.filepath)
        row = layout.row(align=True)
        if icon_id:
            row.label(text="", icon_value=icon_id)
        else:
            row.label(text="", icon="IMAGE_DATA")
        row.label(text=f"{item.prompt}  (seed {item.seed})")


def draw_generate_button(layout: bpy.types.UILayout, scale_y: float = 1.0) -> None:
    """Generate, or Cancel while a job runs, and the progress under it."""
    row = layout.row(align=True)
    row.scale_y = scale_y
    state = runtime()
    if PUMP.busy or (state is not None and state.running):
        row.operator("dit360.cancel", icon="CANCEL")
    else:
        row.operator("dit360.generate", icon="WORLD")
    draw_progress(layout)


class DIT360_PT_main(bpy.types.Panel):
    bl_label = "DiT360 World"
    bl_idname = "DIT360_PT_main"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "DiT360"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        settings = context.scene.dit360
        draw_setup_hints(layout)
        schedule_warm()
        layout.prop(settings, "prompt", text="")
        row = layout.row(align=True)
        sub = row.row(align=True)
        sub.enabled = not settings.randomize_seed
        sub.prop(settings, "seed")
        row.prop(settings, "randomize_seed", text="", icon="FILE_REFRESH")
        col = layout.column(align=True)
        col.prop(settings, "steps")
        col.prop(settings, "guidance")
        col.prop(settings, "lora_strength")
        layout.prop(settings, "speed", expand=True)
        resolution_ui.draw_resolution(layout, settings)
        draw_generate_button(layout, scale_y=1.5)


class DIT360_PT_advanced(bpy.types.Panel):
    bl_label = "Size and Output"
    bl_parent_id = "DIT360_PT_main"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "DiT360"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context: bpy.types.Context) -> None:
        settings = context.scene.dit360
        col = self.layout.column(align=True)
        col.prop(settings, "width")
        col.prop(settings, "height")
        if settings.width != 2 * settings.height or settings.width % 16:
            self.layout.label(text="Use 2:1 sizes in multiples of 16 (e.g. 2048×1024).", icon="ERROR")
        self.layout.prop(settings, "output_dir")
        self.layout.prop(settings, "pack_image")
        self.layout.operator("dit360.stop_worker", icon="X")


class DIT360_PT_loras(bpy.types.Panel):
    bl_label = "Extra LoRAs"
    bl_parent_id = "DIT360_PT_main"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "DiT360"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        for index, item in enumerate(context.scene.dit360.loras):
            row = layout.row(align=True)
            row.prop(item, "path", text="")
            row.prop(item, "strength", text="")
            row.operator("dit360.remove_lora", text="", icon="X").index = index
        layout.operator("dit360.add_lora", icon="ADD")


class DIT360_PT_world(bpy.types.Panel):
    bl_label = "World"
    bl_parent_id = "DIT360_PT_main"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "DiT360"

    def draw(self, context: bpy.types.Context) -> None:
        draw_world_controls(self.layout, context)


class DIT360_PT_history(bpy.types.Panel):
    bl_label = "History"
    bl_parent_id = "DIT360_PT_main"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "DiT360"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        settings = context.scene.dit360
        if not len(settings.history):
            layout.label(text="Generated worlds appear here.")
            return
        layout.template_list("DIT360_UL_history", "", settings, "history", settings, "history_index", rows=3)
        index = settings.history_index
        if not 0 <= index < len(settings.history):
            return
        entry = settings.history[index]
        icon_id = _thumbnail(resolution.smallest_file(entry))  # the 2K one, not a 16K upscale
        if icon_id:
            layout.template_icon(icon_value=icon_id, scale=6.0)
        col = layout.column(align=True)
        _wrap(col, entry.prompt, lines=3)
        col.label(text=f"Seed {entry.seed} · {entry.steps} steps · guidance {entry.guidance:.1f} · "
                  f"LoRA {entry.lora_strength:.2f}")  # fmt: skip
        col.label(text=f"{entry.width}×{entry.height} · {entry.seconds:.0f} s · {entry.created}")
        resolution_ui.draw_entry_sizes(col, entry, index)
        (seam, seam_ok), (sun, found) = history.entry_summary(entry)
        draw_environment_info(layout, {"seam": seam, "seam_ok": seam_ok, "sun": sun, "sun_found": found})
        row = layout.row(align=True)
        row.operator("dit360.apply_history", icon="WORLD").index = index
        row.operator("dit360.history_to_panel", icon="PASTEDOWN").index = index
        row.operator("dit360.remove_history", text="", icon="TRASH").index = index


class DIT360_PT_world_properties(bpy.types.Panel):
    bl_label = "DiT360 Environment"
    bl_idname = "DIT360_PT_world_properties"
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "world"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        draw_world_controls(layout, context)
        draw_generate_button(layout)


CLASSES = (
    DIT360_UL_history,
    DIT360_PT_main,
    DIT360_PT_advanced,
    DIT360_PT_loras,
    DIT360_PT_world,
    DIT360_PT_history,
    DIT360_PT_world_properties,
)
