"""Add-on preferences (keyed by the add-on's package name): dependencies, models, performance."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

from ..redact import token_problem
from . import remote_prefs
from .common import ADDON_PACKAGE, FLUX_LICENSE_URL, TOKENS_URL, runtime, user_dir
from .param_props import param_property
from .pump import PUMP

_PATH_NAMES = {
    "transformer": ("Transformer", "flux1-dev.safetensors (or an fp8 / diffusers transformer)", "FILE_PATH"),
    "vae": ("VAE", "ae.safetensors (or a diffusers vae/ folder)", "FILE_PATH"),
    "text_encoder": ("CLIP Text Encoder", "FLUX.1-dev text_encoder/ folder", "DIR_PATH"),
    "tokenizer": ("CLIP Tokenizer", "FLUX.1-dev tokenizer/ folder", "DIR_PATH"),
    "text_encoder_2": ("T5 Text Encoder", "FLUX.1-dev text_encoder_2/ folder", "DIR_PATH"),
    "tokenizer_2": ("T5 Tokenizer", "FLUX.1-dev tokenizer_2/ folder", "DIR_PATH"),
    "lora": ("DiT360 LoRA", "the DiT360 adapter .safetensors", "FILE_PATH"),
}


def _path_prop(component: str) -> StringProperty:
    name, description, subtype = _PATH_NAMES[component]
    return StringProperty(
        name=name, description=f"{description}; empty: look in the folder / cache", subtype=subtype
    )


class DIT360_Preferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_PACKAGE

    # -- dependencies
    python_source: EnumProperty(
        name="Worker Python",
        items=[
            (
                "BLENDER",
                "Blender's Python",
                "Blender's own Python with the packages installed by Install "
                "Dependencies (in the add-on's user folder)",
            ),
            (
                "CUSTOM",
                "Existing Environment",
                "The Python interpreter of an environment that already has "
                "torch, transformers, safetensors, huggingface_hub (e.g. made with vendor_setup.py --venv)",
            ),
        ],  # fmt: skip
        default="BLENDER",
    )
    python_path: StringProperty(
        name="Python",
        description="The python executable of that environment (…/bin/python or …\\Scripts\\python.exe)",
        subtype="FILE_PATH",
    )
    # -- the worker: this computer's, or a remote GPU machine's (remote_prefs.py)
    worker_mode: remote_prefs.WORKER_MODE
    remote_connection: remote_prefs.REMOTE_CONNECTION
    remote_ssh_alias: remote_prefs.REMOTE_SSH_ALIAS
    remote_port: remote_prefs.REMOTE_PORT
    remote_address: remote_prefs.REMOTE_ADDRESS
    remote_token_file: remote_prefs.REMOTE_TOKEN_FILE
    # -- models
    models_source: EnumProperty(
        name="Model Files",
        items=[
            ("CACHE", "Hugging Face Cache", "Where huggingface_hub keeps downloads (~/.cache/huggingface)"),
            ("FOLDER", "Models Folder", "A folder holding FLUX.1-dev/ and DiT360/ (downloads go there too)"),
            ("FILES", "Individual Files", "Choose each file; empty ones are looked up in the folder / cache"),
        ],
        default="CACHE",
    )
    models_dir: StringProperty(
        name="Models Folder",
        description="Holds FLUX.1-dev/ and DiT360/ as on the Hugging Face Hub (~34 GB)",
        subtype="DIR_PATH",
    )
    transformer_path: _path_prop("transformer")
    vae_path: _path_prop("vae")
    text_encoder_path: _path_prop("text_encoder")
    tokenizer_path: _path_prop("tokenizer")
    text_encoder_2_path: _path_prop("text_encoder_2")
    tokenizer_2_path: _path_prop("tokenizer_2")
    lora_path: _path_prop("lora")
    hf_token: StringProperty(
        name="Hugging Face Token",
        description="A read token of an account that accepted the FLUX.1 [dev] licence. Kept in Blender's "
        "preferences only and given to the worker through its environment",
        subtype="PASSWORD",
    )
    # -- performance
    # job settings kept in the preferences: names, choices and limits from the parameter table
    device: param_property("device")
    gpus: param_property("gpus")
    dtype: param_property("dtype")
    memory_mode: param_property("memory_mode")
    vram_budget_gib: param_property("vram_budget_gib", name="VRAM Budget (GiB)")
    idle_minutes: IntProperty(
        name="Stop Idle Worker After (min)",
        description="Stop the worker (freeing its memory) after this many idle minutes; 0: keep it",
        default=10,
        min=0,
        max=24 * 60,
    )
    preview_every: param_property("preview_every")
    vae_wrap: param_property("vae_wrap")
    warm_on_open: BoolProperty(
        name="Load the Model When the Panel Opens",
        description="Start the worker and load (and compile) the model in the background as soon as "
        "the DiT360 panel is shown, so the first Generate starts sampling at once. Once per session "
        "for each combination of settings; the loaded model holds its memory until the worker stops "
        "when idle. Never downloads",
        default=False,
    )
    show_files: BoolProperty(name="Show Individual Files", default=False)

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        state = runtime()
        if state is None:
            return
        if state.deps_state == "UNKNOWN" and not PUMP.setup.running("deps_check"):
            schedule_checks()
        remote_prefs.draw(self, layout.box())
        self._draw_dependencies(layout.box(), state)
        self._draw_models(layout.box(), state)
        self._draw_performance(layout.box())

    def _draw_dependencies(self, box: bpy.types.UILayout, state: bpy.types.PropertyGroup) -> None:
        box.label(text="Dependencies", icon="SCRIPTPLUGINS")
        box.prop(self, "python_source", expand=True)
        if self.python_source == "CUSTOM":
            box.prop(self, "python_path")
        else:
            box.label(text=f"Packages go to {user_dir('vendor', create=False)}", icon="FILE_FOLDER")
        icon = {"OK": "CHECKMARK", "MISSING": "ERROR", "FAILED": "ERROR"}.get(state.deps_state, "TIME")
        row = box.row()
        row.label(text=f"{state.bl_rna.properties['deps_state'].enum_items[state.deps_state].name}: "
                  f"{state.deps_summary}", icon=icon)  # fmt: skip
        row.operator("dit360.check_dependencies", text="", icon="FILE_REFRESH")
        if state.deps_detail:
            box.label(text=state.deps_detail)
        if self.python_source == "BLENDER":
            row = box.row()
            installing = PUMP.setup.running("install")
            row.enabled = not installing
            row.operator("dit360.install_dependencies", icon="IMPORT")
            if installing:
                col = box.column()
                col.progress(factor=0.0, type="RING", text=f"Installing… {state.install_elapsed:.0f} s")
                col.label(text=state.install_status)
                col.operator("dit360.cancel_install", icon="CANCEL")
            elif state.install_status:
                box.label(text=state.install_status)
            if state.install_log:
                op = box.operator("wm.path_open", text="Open Install Log", icon="TEXT")
                op.filepath = state.install_log

    def _draw_models(self, box: bpy.types.UILayout, state: bpy.types.PropertyGroup) -> None:
        box.label(text="Models (FLUX.1-dev + DiT360 LoRA, ~34 GB)", icon="FILE_3D")
        box.prop(self, "models_source", expand=True)
        if self.models_source in {"FOLDER", "FILES"}:
            box.prop(self, "models_dir")
        if self.models_source == "FILES":
            col = box.column(align=True)
            for component in _PATH_NAMES:
                col.prop(self, f"{component}_path")
        row = box.row()
        icon = {"OK": "CHECKMARK", "MISSING": "ERROR", "FAILED": "ERROR"}.get(state.models_state, "TIME")
        row.label(text=state.models_summary or "Not checked yet.", icon=icon)
        row.operator("dit360.check_models", text="", icon="FILE_REFRESH")
        box.prop(self, "hf_token")
        if self.hf_token.strip() and token_problem(self.hf_token):  # link.hf_token() ignores it
            box.label(text="Not used: " + token_problem(self.hf_token), icon="ERROR")
        row = box.row(align=True)
        row.operator("wm.url_open", text="Accept FLUX.1-dev Licence", icon="URL").url = FLUX_LICENSE_URL
        row.operator("wm.url_open", text="Create Token", icon="URL").url = TOKENS_URL
        downloading = PUMP.setup.running("download")
        row = box.row()
        row.enabled = not downloading
        row.operator("dit360.download_models", icon="IMPORT")
        if not bpy.app.online_access:
            box.label(text="Online access is off (Preferences ▸ System ▸ Network): downloads are blocked.",
                      icon="INFO")  # fmt: skip
        if downloading:
            box.operator("dit360.cancel_download", icon="CANCEL")
        if state.download_status:
            box.label(text=state.download_status)
        col = box.column(align=True)
        for entry in state.download_files:
            size = (
                f"{entry.done / 1e9:.2f}/{entry.total / 1e9:.2f} GB"
                if entry.total
                else f"{entry.done / 1e9:.2f} GB"
            )
            col.progress(factor=entry.progress, text=f"{entry.name}  {size}")
        if state.download_error:
            err = box.column()
            err.alert = True
            for line in state.download_error.splitlines()[:6]:
                err.label(text=line, icon="ERROR")
            for line in state.download_hint.splitlines()[:8]:
                box.label(text=line)
        if state.download_log:
            box.operator("wm.path_open", text="Open Download Log", icon="TEXT").filepath = state.download_log

    def _draw_performance(self, box: bpy.types.UILayout) -> None:
        box.label(text="Performance", icon="PREFERENCES")
        col = box.column()
        col.prop(self, "device")
        col.prop(self, "gpus")
        col.prop(self, "dtype")
        col.prop(self, "memory_mode")
        sub = col.row()
        sub.enabled = self.memory_mode == "STREAM"
        sub.prop(self, "vram_budget_gib")
        col.prop(self, "preview_every")
        col.prop(self, "vae_wrap")
        col.prop(self, "idle_minutes")
        col.prop(self, "warm_on_open")
        state = runtime()
        if state is not None and state.worker_info:
            box.label(text=state.worker_info, icon="INFO")
        box.operator("dit360.stop_worker", icon="X")


def _run_checks() -> None:
    state = runtime()
    if state is not None and state.deps_state == "UNKNOWN" and not PUMP.setup.running("deps_check"):
        PUMP.setup.start_deps_check()
    if state is not None and state.models_state == "UNKNOWN" and not PUMP.setup.running("models_check"):
        PUMP.setup.start_models_check()
    return None


def schedule_checks() -> None:
    """Check dependencies and models once, in the background. Drawing must not start processes, so
    the panels ask for it and a one-shot timer does it right after the draw."""
    if not bpy.app.timers.is_registered(_run_checks):
        bpy.app.timers.register(_run_checks, first_interval=0.0)


CLASSES = (DIT360_Preferences,)
