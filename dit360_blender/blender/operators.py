"""Operators: generate / cancel / stop the worker, history, preview lighting, dependencies, models."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

from ..params import MAX_LORAS
from . import history, resolution_ops
from .common import ADDON_PACKAGE, runtime, tag_redraw
from .errors import GenerationError
from .param_props import param_property
from .pump import PUMP


def _show_error(err: GenerationError) -> None:
    state = runtime()
    if state is not None:
        state.error_code, state.error_message, state.error_hint = err.code, err.message, err.hint
        state.status = "Failed."
    tag_redraw()


# the generation settings a script may pass to dit360.generate; the rest come from the panel
OVERRIDABLE = (
    "prompt",
    "seed",
    "steps",
    "guidance",
    "lora_strength",
    "width",
    "height",
    "sun_share",
    "speed",
    "output_dir",
    "size",
    "refine",
    "refine_strength",
)


class DIT360_OT_generate(bpy.types.Operator):
    """Generate a 360° world from the prompt and use it as the scene's World"""

    bl_idname = "dit360.generate"
    bl_label = "Generate World"
    bl_options = {"REGISTER", "UNDO"}

    # Unset properties take the panel's values: scripts pass only what they want to change.
    # Names, limits and help are the parameter table's (params.py), as for the panel.
    prompt: param_property("prompt", options={"SKIP_SAVE"})
    seed: param_property("seed", options={"SKIP_SAVE"})
    steps: param_property("steps", options={"SKIP_SAVE"})
    guidance: param_property("guidance", options={"SKIP_SAVE"})
    lora_strength: param_property("lora_strength", options={"SKIP_SAVE"})
    width: param_property("width", options={"SKIP_SAVE"})
    height: param_property("height", options={"SKIP_SAVE"})
    sun_share: param_property("sun_share", options={"SKIP_SAVE"})
    speed: param_property("speed", options={"SKIP_SAVE"})
    output_dir: param_property("output_dir", subtype="DIR_PATH", options={"SKIP_SAVE"})
    size: param_property("size", options={"SKIP_SAVE"})
    refine: param_property("refine", options={"SKIP_SAVE"})
    refine_strength: param_property("refine_strength", options={"SKIP_SAVE"})
    wait: BoolProperty(
        name="Wait",
        description="Block until the world is done (the default in background mode, where timers never run)",
        default=False,
        options={"SKIP_SAVE"},
    )

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if PUMP.busy:
            cls.poll_message_set("A world is being generated")
            return False
        return context.scene is not None

    def execute(self, context: bpy.types.Context) -> set[str]:
        overrides = {
            name: getattr(self, name) for name in OVERRIDABLE if self.properties.is_property_set(name)
        }
        if "output_dir" in overrides:
            overrides["output_dir"] = bpy.path.abspath(str(overrides["output_dir"]))
        block = self.wait or (bpy.app.background and not self.properties.is_property_set("wait"))
        try:
            job = PUMP.start_generation(context.scene, **overrides)
        except GenerationError as err:
            _show_error(err)
            self.report({"ERROR"}, f"{err.message} — {err.hint}" if err.hint else err.message)
            return {"CANCELLED"}
        if not block:
            return {"FINISHED"}
        job.push_undo = False  # this operator's own undo step holds the result
        last = resolution_ops.wait_chain(job)  # with a Resolution above 2K, its upscale too
        if last is not job and job.error is None and last.error is not None:
            self.report({"WARNING"}, f"The 2K world is applied; its upscale failed: {last.error.message}")
            return {"FINISHED"}
        if job.error is not None:
            self.report(
                {"ERROR"}, f"{job.error.message} — {job.error.hint}" if job.error.hint else job.error.message
            )
            return {"CANCELLED"}
        return {"FINISHED"}


class DIT360_OT_cancel(bpy.types.Operator):
    """Stop the running generation within one sampling step; the World stays as it was"""

    bl_idname = "dit360.cancel"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return PUMP.busy

    def execute(self, context: bpy.types.Context) -> set[str]:
        PUMP.cancel()
        return {"FINISHED"}


class DIT360_OT_stop_worker(bpy.types.Operator):
    """Stop the background worker and free its memory (GPU memory included); the next generation starts a new one"""

    bl_idname = "dit360.stop_worker"
    bl_label = "Stop Worker"

    def execute(self, context: bpy.types.Context) -> set[str]:
        PUMP.link.stop()
        state = runtime()
        if state is not None:
            state.worker_info = "Worker stopped."
        return {"FINISHED"}


def _history_entry(context: bpy.types.Context, index: int):
    items = context.scene.dit360.history
    return items[index] if 0 <= index < len(items) else None


class DIT360_OT_apply_history(bpy.types.Operator):
    """Use this earlier environment as the scene's World again"""

    bl_idname = "dit360.apply_history"
    bl_label = "Apply Environment"
    bl_options = {"REGISTER", "UNDO"}

    index: IntProperty(name="Index", default=0, min=0)

    def execute(self, context: bpy.types.Context) -> set[str]:
        entry = _history_entry(context, self.index)
        if entry is None:
            self.report({"ERROR"}, "No such history entry.")
            return {"CANCELLED"}
        if history.apply(context.scene, entry) is None:
            self.report({"ERROR"}, f"The image {entry.filepath} is gone (moved or deleted); generate it again "
                        "with Copy Settings.")  # fmt: skip
            return {"CANCELLED"}
        return {"FINISHED"}


class DIT360_OT_history_to_panel(bpy.types.Operator):
    """Copy this environment's prompt, seed and settings into the panel"""

    bl_idname = "dit360.history_to_panel"
    bl_label = "Copy Settings"
    bl_options = {"REGISTER", "UNDO"}

    index: IntProperty(name="Index", default=0, min=0)

    def execute(self, context: bpy.types.Context) -> set[str]:
        entry = _history_entry(context, self.index)
        if entry is None:
            return {"CANCELLED"}
        history.copy_to_panel(context.scene, entry)
        return {"FINISHED"}


class DIT360_OT_remove_history(bpy.types.Operator):
    """Remove this entry from the history (the image file stays on disk)"""

    bl_idname = "dit360.remove_history"
    bl_label = "Remove From History"
    bl_options = {"REGISTER", "UNDO"}

    index: IntProperty(name="Index", default=0, min=0)

    def execute(self, context: bpy.types.Context) -> set[str]:
        settings = context.scene.dit360
        if 0 <= self.index < len(settings.history):
            settings.history.remove(self.index)
            settings.history_index = min(settings.history_index, max(0, len(settings.history) - 1))
        return {"FINISHED"}


class DIT360_OT_add_lora(bpy.types.Operator):
    """Add one of your own FLUX LoRAs (a .safetensors file) on top of DiT360"""

    bl_idname = "dit360.add_lora"
    bl_label = "Add LoRA"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context: bpy.types.Context) -> set[str]:
        loras = context.scene.dit360.loras
        if len(loras) >= MAX_LORAS:
            self.report({"ERROR"}, f"At most {MAX_LORAS} extra LoRAs.")
            return {"CANCELLED"}
        loras.add()
        return {"FINISHED"}


class DIT360_OT_remove_lora(bpy.types.Operator):
    """Remove this LoRA from the list (the file stays on disk)"""

    bl_idname = "dit360.remove_lora"
    bl_label = "Remove LoRA"
    bl_options = {"REGISTER", "UNDO"}

    index: IntProperty(name="Index", default=0, min=0)

    def execute(self, context: bpy.types.Context) -> set[str]:
        loras = context.scene.dit360.loras
        if not 0 <= self.index < len(loras):
            return {"CANCELLED"}
        loras.remove(self.index)
        return {"FINISHED"}


class DIT360_OT_preview_lighting(bpy.types.Operator):
    """Show the scene lit by its World in the 3D viewports (Material Preview or Rendered, with the scene World instead of a studio HDRI)"""

    bl_idname = "dit360.preview_lighting"
    bl_label = "Preview Lighting"

    mode: EnumProperty(
        name="Shading",
        items=[
            ("MATERIAL", "Material Preview", "Eevee preview of the materials"),
            ("RENDERED", "Rendered", ""),
        ],
        default="MATERIAL",
    )

    def execute(self, context: bpy.types.Context) -> set[str]:
        screens = [w.screen for w in context.window_manager.windows if w.screen is not None]
        count = 0
        for screen in screens:
            for area in screen.areas:
                if area.type != "VIEW_3D":
                    continue
                for space in area.spaces:
                    if space.type != "VIEW_3D":
                        continue
                    shading = space.shading
                    shading.type = self.mode
                    if self.mode == "MATERIAL":
                        shading.use_scene_world = True
                        shading.use_scene_lights = True
                    else:
                        shading.use_scene_world_render = True
                        shading.use_scene_lights_render = True
                    count += 1
                area.tag_redraw()
        if not count:
            self.report({"WARNING"}, "No 3D Viewport is open.")
            return {"CANCELLED"}
        return {"FINISHED"}


class DIT360_OT_install_dependencies(bpy.types.Operator):
    """Install torch, transformers, safetensors, huggingface_hub, … for Blender's Python into the add-on's user folder (several GB; runs in the background)"""

    bl_idname = "dit360.install_dependencies"
    bl_label = "Install Dependencies"

    # A testing aid, as vendor_setup.py's own --packages: install only these.
    packages: StringProperty(options={"HIDDEN", "SKIP_SAVE"})

    def execute(self, context: bpy.types.Context) -> set[str]:
        if not bpy.app.online_access:
            self.report(
                {"ERROR"}, "Online access is off: allow it in Preferences ▸ System ▸ Network to install."
            )
            return {"CANCELLED"}
        try:
            PUMP.setup.start_install(self.packages)
        except (GenerationError, OSError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


class DIT360_OT_cancel_install(bpy.types.Operator):
    """Stop the installation"""

    bl_idname = "dit360.cancel_install"
    bl_label = "Stop Installing"

    def execute(self, context: bpy.types.Context) -> set[str]:
        PUMP.setup.cancel("install")
        return {"FINISHED"}


class DIT360_OT_check_dependencies(bpy.types.Operator):
    """Check that the worker's Python has its packages, and which device torch sees"""

    bl_idname = "dit360.check_dependencies"
    bl_label = "Check Dependencies"

    def execute(self, context: bpy.types.Context) -> set[str]:
        PUMP.setup.start_deps_check()
        return {"FINISHED"}


class DIT360_OT_check_models(bpy.types.Operator):
    """Look for the model files where the preferences say (no download)"""

    bl_idname = "dit360.check_models"
    bl_label = "Check Models"

    def execute(self, context: bpy.types.Context) -> set[str]:
        PUMP.setup.start_models_check()
        return {"FINISHED"}


class DIT360_OT_download_models(bpy.types.Operator):
    """Download the missing FLUX.1-dev and DiT360 files (~34 GB) from Hugging Face; needs online access and, for FLUX.1-dev, an accepted licence and a token"""

    bl_idname = "dit360.download_models"
    bl_label = "Download Models"

    def execute(self, context: bpy.types.Context) -> set[str]:
        if not PUMP.setup.start_download():
            state = runtime()
            self.report({"ERROR"}, state.download_error if state is not None else "Download refused.")
            return {"CANCELLED"}
        return {"FINISHED"}


class DIT360_OT_cancel_download(bpy.types.Operator):
    """Stop the download (finished files are kept)"""

    bl_idname = "dit360.cancel_download"
    bl_label = "Stop Download"

    def execute(self, context: bpy.types.Context) -> set[str]:
        PUMP.setup.cancel("download")
        return {"FINISHED"}


class DIT360_OT_open_preferences(bpy.types.Operator):
    """Open this add-on's preferences"""

    bl_idname = "dit360.open_preferences"
    bl_label = "Open Add-on Preferences"

    def execute(self, context: bpy.types.Context) -> set[str]:
        bpy.ops.preferences.addon_show(module=ADDON_PACKAGE)
        return {"FINISHED"}


class DIT360_OT_clear_error(bpy.types.Operator):
    """Hide the last error"""

    bl_idname = "dit360.clear_error"
    bl_label = "Dismiss"

    def execute(self, context: bpy.types.Context) -> set[str]:
        state = runtime()
        if state is not None:
            state.error_code = state.error_message = state.error_hint = ""
        return {"FINISHED"}


CLASSES = (
    DIT360_OT_generate,
    DIT360_OT_cancel,
    DIT360_OT_stop_worker,
    DIT360_OT_apply_history,
    DIT360_OT_history_to_panel,
    DIT360_OT_remove_history,
    DIT360_OT_add_lora,
    DIT360_OT_remove_lora,
    DIT360_OT_preview_lighting,
    DIT360_OT_install_dependencies,
    DIT360_OT_cancel_install,
    DIT360_OT_check_dependencies,
    DIT360_OT_check_models,
    DIT360_OT_download_models,
    DIT360_OT_cancel_download,
    DIT360_OT_open_preferences,
    DIT360_OT_clear_error,
    *resolution_ops.CLASSES,  # Upscale a history entry (issue 15)
)
