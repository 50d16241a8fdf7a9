"""Property groups: the panel's settings (Scene), World controls (World), runtime state (WindowManager).

Settings a user would want saved with the .blend (prompt, seed, history) live on the Scene; the
World's look (rotation, strength, camera/lighting split) on the World it belongs to; everything that
changes while a job runs (progress, status, errors, downloads) on the WindowManager, which Blender
never saves, so a running job does not dirty the file or flood the undo history.
"""

from __future__ import annotations

import math

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from ..params import BY_NAME
from . import lighting
from . import world as world_nodes
from .param_props import param_property

DEFAULT_PROMPT = "This is a panorama image. A sunny alpine meadow with scattered pine trees under a blue sky"
MAX_SEED = BY_NAME["seed"].blender_range()[1]  # a Blender IntProperty holds 32 bits


class DIT360_HistorySize(bpy.types.PropertyGroup):
    """One size of a history entry (2K as generated, 4K/8K/16K upscaled): blender/resolution.py."""

    width: IntProperty(name="Width")
    height: IntProperty(name="Height")
    filepath: StringProperty(name="File", subtype="FILE_PATH")
    hdr_path: StringProperty(name="HDR", subtype="FILE_PATH")
    lighting_path: StringProperty(name="HDR (sun clamped)", subtype="FILE_PATH")


class DIT360_HistoryEntry(bpy.types.PropertyGroup):
    """One generated environment: enough to show it, re-apply it and generate it again."""

    prompt: param_property("prompt")
    seed: param_property("seed")
    steps: param_property("steps")
    guidance: param_property("guidance")
    lora_strength: param_property("lora_strength")
    width: param_property("width")
    height: param_property("height")
    filepath: StringProperty(name="File", subtype="FILE_PATH")
    image_name: StringProperty(name="Image")
    created: StringProperty(name="Created")
    seconds: FloatProperty(name="Time (s)")
    sun_share: param_property("sun_share")
    speed: param_property("speed")
    size: param_property("size")
    refine: param_property("refine")
    refine_strength: param_property("refine_strength")
    sizes: CollectionProperty(type=DIT360_HistorySize)  # every size made of it, widest first
    # the HDR files beside the PNG (empty: none were written) and the analysis the worker recorded
    hdr_path: StringProperty(name="HDR", subtype="FILE_PATH")
    lighting_path: StringProperty(name="HDR (sun clamped)", subtype="FILE_PATH")
    seam_json: StringProperty(name="Seam Scores")
    lighting_json: StringProperty(name="Lighting")
    # an edit's entry (issue 14): the file it was made from, its mask kind and its values (JSON)
    parent: StringProperty(name="Edited From", subtype="FILE_PATH")
    edit_kind: StringProperty(name="Edit")
    edit_json: StringProperty(name="Edit Settings")


_LORAS = BY_NAME["loras"]


class DIT360_LoraItem(bpy.types.PropertyGroup):
    """One of the user's own LoRAs (an item of the table's `loras`): its file and strength."""

    path: StringProperty(
        name="LoRA File",
        description="A FLUX LoRA .safetensors (kohya, BFL/ComfyUI or diffusers format)",
        subtype="FILE_PATH",
    )
    strength: FloatProperty(
        name="Strength",
        description="How strongly this LoRA applies on top of DiT360 (1.0 as trained)",
        default=1.0,
        min=_LORAS.minimum,
        max=_LORAS.maximum,
        soft_min=0.0,
        soft_max=2.0,
    )


class DIT360_SceneSettings(bpy.types.PropertyGroup):
    # the generation settings: names, limits and help are the parameter table's (params.py)
    prompt: param_property("prompt", default=DEFAULT_PROMPT)
    seed: param_property("seed")
    randomize_seed: BoolProperty(
        name="Random Seed", description="Pick a new seed for every generation", default=True
    )
    steps: param_property("steps")
    guidance: param_property("guidance")
    lora_strength: param_property("lora_strength")
    width: param_property("width")
    height: param_property("height")
    sun_share: param_property("sun_share", subtype="FACTOR")
    speed: param_property("speed")
    size: param_property("size")
    refine: param_property("refine")
    refine_strength: param_property("refine_strength", subtype="FACTOR")
    output_dir: param_property(
        "output_dir",
        description="Where generated images are written. Empty: //dit360/ next to the saved .blend, "
        "else a folder in the add-on's user data",
        subtype="DIR_PATH",
    )
    pack_image: BoolProperty(
        name="Pack Into .blend", description="Embed generated images in the .blend file", default=False
    )
    show_advanced: BoolProperty(name="Advanced", default=False)
    loras: CollectionProperty(type=DIT360_LoraItem, name=_LORAS.label, description=_LORAS.help)
    history: CollectionProperty(type=DIT360_HistoryEntry)
    history_index: IntProperty(name="History", default=0)


def _sync(self: bpy.types.PropertyGroup, context: bpy.types.Context) -> None:
    world = self.id_data
    if isinstance(world, bpy.types.World):
        world_nodes.sync_controls(world)
        lighting.update_suns(world)  # the Sun's strength follows the Background's; its driver, the rotation


def _sun_toggled(self: bpy.types.PropertyGroup, context: bpy.types.Context) -> None:
    world = self.id_data
    if isinstance(world, bpy.types.World):
        lighting.refresh(world)


class DIT360_WorldSettings(bpy.types.PropertyGroup):
    rotation: FloatProperty(
        name="Rotation",
        description="Turns the environment around the vertical axis (the Mapping node's Z rotation)",
        subtype="ANGLE",
        default=0.0,
        min=-2 * math.pi,
        max=2 * math.pi,
        update=_sync,
    )
    strength: FloatProperty(
        name="Strength",
        description="How bright the environment is: a multiplier on its computed exposure (the "
        "Background strength at which a grey card facing up renders 18 % grey)",
        default=1.0,
        min=0.0,
        soft_max=10.0,
        update=_sync,
    )
    split_camera: BoolProperty(
        name="Separate Camera Background",
        description="Let what the camera sees and what lights the scene have their own strengths "
        "(Light Path ▸ Is Camera Ray)",
        default=False,
        update=_sync,
    )
    camera_strength: FloatProperty(
        name="Camera Strength",
        description="Brightness of the environment as the camera sees it (a multiplier on the exposure)",
        default=1.0,
        min=0.0,
        soft_max=10.0,
        update=_sync,
    )
    use_sun: BoolProperty(
        name="Sun Lamp",
        description="Light with a Sun lamp aimed at the detected sun (sharp shadows, in Cycles and EEVEE) "
        "and the environment with the sun clamped out of it; off: the sun stays in the environment image",
        default=True,
        update=_sun_toggled,
    )
    sun_strength: FloatProperty(
        name="Sun Strength",
        description="A multiplier on the Sun lamp's computed strength (1: the light the sun had in the "
        "environment)",
        default=1.0,
        min=0.0,
        soft_max=4.0,
        update=_sync,
    )
    # The other HDR of the environment shown (the sun in the map / clamped), so the Sun Lamp toggle
    # can switch to it without its file: it is saved, packed and appended along with the World.
    other_hdr: PointerProperty(type=bpy.types.Image, options={"HIDDEN"})


class DIT360_DownloadFile(bpy.types.PropertyGroup):
    done: FloatProperty()  # bytes; a float because files exceed IntProperty's 32 bits
    total: FloatProperty()
    progress: FloatProperty(subtype="FACTOR", min=0.0, max=1.0)


_DEPS_STATES = [
    ("UNKNOWN", "Not Checked", ""),
    ("CHECKING", "Checking", ""),
    ("OK", "Installed", ""),
    ("MISSING", "Missing", ""),
    ("INSTALLING", "Installing", ""),
    ("FAILED", "Failed", ""),
]
_MODEL_STATES = [
    ("UNKNOWN", "Not Checked", ""),
    ("CHECKING", "Checking", ""),
    ("OK", "Found", ""),
    ("MISSING", "Missing", ""),
    ("DOWNLOADING", "Downloading", ""),
    ("FAILED", "Failed", ""),
]


class DIT360_Runtime(bpy.types.PropertyGroup):
    """What is happening now. On the WindowManager: never saved, never in undo."""

    running: BoolProperty()
    job_id: StringProperty()
    stage: StringProperty()
    step: IntProperty()
    total: IntProperty()
    progress: FloatProperty(subtype="FACTOR", min=0.0, max=1.0)
    elapsed: FloatProperty()
    eta: FloatProperty(default=-1.0)  # -1: unknown
    status: StringProperty()
    detail: StringProperty()
    error_code: StringProperty()
    error_message: StringProperty()
    error_hint: StringProperty()
    preview_icon: IntProperty()  # icon_id of the live preview (0: none)
    worker_info: StringProperty()

    deps_state: EnumProperty(items=_DEPS_STATES, default="UNKNOWN")
    deps_summary: StringProperty()
    deps_detail: StringProperty()
    install_status: StringProperty()
    install_elapsed: FloatProperty()
    install_log: StringProperty(subtype="FILE_PATH")

    models_state: EnumProperty(items=_MODEL_STATES, default="UNKNOWN")
    models_summary: StringProperty()
    models_missing: StringProperty()
    download_status: StringProperty()
    download_error: StringProperty()
    download_hint: StringProperty()
    download_code: StringProperty()
    download_files: CollectionProperty(type=DIT360_DownloadFile)
    download_log: StringProperty(subtype="FILE_PATH")


CLASSES = (
    DIT360_HistorySize,
    DIT360_HistoryEntry,
    DIT360_LoraItem,
    DIT360_SceneSettings,
    DIT360_WorldSettings,
    DIT360_DownloadFile,
    DIT360_Runtime,
)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.dit360 = PointerProperty(type=DIT360_SceneSettings)
    bpy.types.World.dit360 = PointerProperty(type=DIT360_WorldSettings)
    bpy.types.WindowManager.dit360 = PointerProperty(type=DIT360_Runtime)


def unregister() -> None:
    for owner in (bpy.types.WindowManager, bpy.types.World, bpy.types.Scene):
        if hasattr(owner, "dit360"):
            del owner.dit360
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
