"""Editing the World's panorama (issue 14): Regenerate View, Paint Mask, Regenerate Masked, Photo to
Panorama, Repair Seam, and `start_edit` under them and `api.edit_world`.

An edit is a job of kind "edit" for the worker (params.py holds its parameters); it runs exactly as
a generation does (generation.Generation: progress, previews in a preview World, cancel, a failure
or a cancel leaves the World as it was) and its result goes into the World the same way
(results.apply_result: the float HDR in the DiT360 chain, the Sun lamp, a History entry, one undo
step). The History entry of an edit records its source (`parent`), the mask kind and the edit's own
values (`edit_json`), so it shows as a child of the world it was made from.

The geometry is the add-on's numpy code (panorama/projection.py): the camera's (or the 3D
viewport's) rotation is taken through the World's Mapping node into the panorama's own frame, so
the view the worker regenerates is what the camera sees of the World as it is turned.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import bpy
import numpy as np
from bpy.app.handlers import persistent
from bpy.props import BoolProperty, FloatProperty, PointerProperty, StringProperty

from ..client import Job
from ..panorama import projection
from ..panorama.masks import GeometryError
from ..params import BY_NAME, EDIT
from . import output, paths
from . import world as world_nodes
from .common import prefs, runtime, tag_redraw
from .errors import GenerationError
from .generation import Generation, _reset_state, scene_loras
from .param_props import param_property, prefs_job_values, scene_job_values
from .preview import PreviewWorld
from .props import MAX_SEED
from .pump import PUMP, ensure_timer

MASK_PROP = "dit360_mask"  # the World's custom property holding its painted mask image (an ID pointer)
MASK_ROLE = "mask"
_CAMERA_TYPES = {"ORTHO": "orthographic", "PANO": "panoramic"}
_SOURCE_FORMATS = {".png", ".jpg", ".jpeg", ".hdr", ".exr"}


class DIT360_EditSettings(bpy.types.PropertyGroup):
    """The Edit panel's controls (Scene.dit360_edit); names, limits and help are the table's."""

    prompt: param_property("prompt", default="", description="What the regenerated part shows "
                           "(empty: the panel's prompt)")  # fmt: skip
    strength: param_property("strength")
    feather: param_property("feather")
    band: param_property("band")
    photo: StringProperty(name="Photo", description=BY_NAME["photo"].help, subtype="FILE_PATH")
    photo_hfov: FloatProperty(
        name="Photo FOV", description="The photo's horizontal field of view (0: from its EXIF focal length)",
        default=0.0, min=0.0, max=BY_NAME["hfov"].maximum, unit="NONE",
    )  # fmt: skip
    yaw: param_property("yaw")
    pitch: param_property("pitch")
    use_viewport: BoolProperty(
        name="Use Viewport",
        description="Regenerate what the 3D viewport shows instead of what the scene camera sees",
        default=False,
    )


# -- what the World shows ------------------------------------------------------------------------


def environment_node(world: bpy.types.World | None) -> bpy.types.Node | None:
    """The Environment Texture the World shows: ours, else the first one with an image."""
    if world is None or world.node_tree is None:
        return None
    ours = world_nodes.our_nodes(world).get("env")
    if ours is not None and ours.image is not None:
        return ours
    return next(
        (n for n in world.node_tree.nodes if n.bl_idname == "ShaderNodeTexEnvironment" and n.image), None
    )


def source_file(world: bpy.types.World | None) -> Path:
    """The file of the panorama the World shows, for the worker to edit: our PNG of a generated
    world, else the image's own file; an image that has no file of its kind (packed, generated,
    another format) is written beside the outputs first. GenerationError when there is none."""
    node = environment_node(world)
    if node is None:
        raise GenerationError(
            "bad_parameters", "The World shows no environment image to edit.",
            "Generate a world first, or load an equirectangular image into the World's Environment Texture.",
        )  # fmt: skip
    image = node.image
    png = output.sibling_file(image, "png")
    if png and Path(png).is_file():
        return Path(png)
    if image.packed_file is None and image.source == "FILE":
        path = Path(bpy.path.abspath(image.filepath)).resolve() if image.filepath else None
        if path is not None and path.is_file() and path.suffix.lower() in _SOURCE_FORMATS:
            return path
    return _write_copy(image)


def _write_copy(image: bpy.types.Image, what: str = "source") -> Path:
    """`image` written as a file of its own beside the outputs (the image itself is not changed)."""
    folder = output.output_dir(bpy.context.scene.dit360)
    folder.mkdir(parents=True, exist_ok=True)
    suffix, fmt = (".exr", "OPEN_EXR") if image.is_float else (".png", "PNG")
    path = folder / f"{bpy.path.clean_name(image.name)}-{what}{suffix}"
    copy = image.copy()
    try:
        copy.filepath_raw = str(path)
        copy.file_format = fmt
        copy.save()
    finally:
        bpy.data.images.remove(copy)
    return path


def world_mapping(world: bpy.types.World, node: bpy.types.Node) -> np.ndarray:
    """The 3x3 map from a world direction to the direction `node` reads its image at: the Mapping
    node feeding it (Generated or no coordinates before it), or none."""
    vector = node.inputs["Vector"]
    if not vector.is_linked:
        return np.eye(3)
    mapping = vector.links[0].from_node
    if mapping.bl_idname != "ShaderNodeMapping":
        raise GenerationError(
            "bad_parameters", f"The World's environment is read through a '{mapping.name}' node, not a Mapping node.",
            "Regenerate View follows a Mapping node only: connect Texture Coordinate ▸ Mapping ▸ Environment Texture.",
        )  # fmt: skip
    inputs = mapping.inputs
    for name in ("Rotation", "Scale", "Location"):
        if name in inputs and inputs[name].is_linked:
            raise GenerationError(
                "bad_parameters", f"The Mapping node's {name} is driven by other nodes.",
                "Disconnect it (a fixed rotation is followed), or paint the mask instead.",
            )  # fmt: skip
    try:
        return projection.mapping_matrix(
            tuple(inputs["Rotation"].default_value) if "Rotation" in inputs else (0.0, 0.0, 0.0),
            tuple(inputs["Scale"].default_value) if "Scale" in inputs else (1.0, 1.0, 1.0),
            mapping.vector_type,
        )
    except GeometryError as exc:
        raise GenerationError("bad_parameters", exc.message, exc.hint) from None


# -- the view ------------------------------------------------------------------------------------


def view_from_matrices(rotation, projection_matrix, mapping: np.ndarray) -> dict:
    """The edit's view values (yaw, pitch, roll, hfov, aspect) of a camera: its world rotation (3x3)
    and perspective projection matrix (4x4, Blender's), seen through the World's `mapping`."""
    p = np.asarray(projection_matrix, dtype=np.float64)
    if abs(p[3][3]) > 1e-9 or abs(p[3][2] + 1.0) > 1e-6:
        raise GenerationError(
            "bad_parameters", "The view is orthographic: it sees no directions of the World.",
            "Use a perspective camera or viewport (numpad 5 toggles the viewport).",
        )  # fmt: skip
    if abs(p[0][2]) > 1e-5 or abs(p[1][2]) > 1e-5:
        raise GenerationError(
            "bad_parameters", "The camera's frame is shifted (Lens Shift) or offset in the viewport.",
            "Set the camera's Shift X/Y to 0, or paint the mask instead.",
        )  # fmt: skip
    hfov = math.degrees(2.0 * math.atan(1.0 / p[0][0]))
    aspect = p[1][1] / p[0][0]
    yaw, pitch, roll = projection.view_angles(np.asarray(rotation, dtype=np.float64), mapping)
    limit = BY_NAME["hfov"].maximum
    if not 0 < hfov <= limit:
        raise GenerationError(
            "bad_parameters", f"The view is {hfov:.1f}° wide.", f"Use a field of view below {limit}°."
        )
    return {"yaw": yaw, "pitch": pitch, "roll": roll, "hfov": hfov, "aspect": aspect}


def camera_view(scene: bpy.types.Scene, camera: bpy.types.Object, mapping: np.ndarray) -> dict:
    """The view of `camera` as it renders the scene (sensor fit, resolution and pixel aspect)."""
    if camera is None or camera.type != "CAMERA":
        raise GenerationError(
            "bad_parameters", "The scene has no active camera.",
            "Add a camera and make it active (Ctrl+Numpad 0), or use the viewport's view.",
        )  # fmt: skip
    if camera.data.type != "PERSP":
        raise GenerationError(
            "bad_parameters",
            f"The camera '{camera.name}' is {_CAMERA_TYPES.get(camera.data.type, camera.data.type)}, not perspective.",
            "Set its Type to Perspective.",
        )  # fmt: skip
    r = scene.render
    matrix = camera.calc_matrix_camera(
        bpy.context.evaluated_depsgraph_get(),
        x=r.resolution_x, y=r.resolution_y, scale_x=r.pixel_aspect_x, scale_y=r.pixel_aspect_y,
    )  # fmt: skip
    return view_from_matrices(camera.matrix_world.to_3x3(), matrix, mapping)


def viewport_view(region_data, mapping: np.ndarray) -> dict:
    """The view of a 3D viewport (its RegionView3D): the inverse of its view matrix turns the view's
    axes into the world's, its window matrix is its projection."""
    if not region_data.is_perspective:
        raise GenerationError(
            "bad_parameters", "The viewport is orthographic.", "Switch it to perspective (numpad 5)."
        )
    rotation = region_data.view_matrix.inverted().to_3x3()
    return view_from_matrices(rotation, region_data.window_matrix, mapping)


# -- the mask image ------------------------------------------------------------------------------


def world_mask(world: bpy.types.World | None) -> bpy.types.Image | None:
    image = world.get(MASK_PROP) if world is not None else None
    return image if isinstance(image, bpy.types.Image) else None


def ensure_mask(scene: bpy.types.Scene, world: bpy.types.World) -> bpy.types.Image:
    """The World's mask image, made when absent: black (keep everything), half the panorama's size,
    a PNG beside the outputs so it is on disk from the start; its path is kept relative to the .blend
    like the outputs'. Painted strokes are saved with every save of the .blend (save_pre)."""
    image = world_mask(world)
    if image is not None:
        return image
    node = environment_node(world)
    width, height = node.image.size if node is not None and node.image.size[0] else (2048, 1024)
    width, height = max(64, width // 2), max(32, height // 2)
    folder = output.output_dir(scene.dit360)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{bpy.path.clean_name(world.name)}_mask.png"
    image = bpy.data.images.new(f"DiT360 Mask ({world.name})", width=width, height=height, alpha=False)
    image.generated_color = (0.0, 0.0, 0.0, 1.0)
    image.colorspace_settings.name = "Non-Color"
    image.filepath_raw = str(path)
    image.file_format = "PNG"
    image.save()
    image.filepath = paths.stored(path)
    image["dit360_role"] = MASK_ROLE
    world[MASK_PROP] = image
    return image


def save_mask(image: bpy.types.Image) -> Path:
    """Write the painted mask to its file and return the path; a packed mask (or one without a
    file) is written as a copy beside the outputs and stays packed."""
    if image.packed_file is not None or not image.filepath:
        return _write_copy(image, "mask")
    path = Path(bpy.path.abspath(image.filepath))
    if image.is_dirty or not path.is_file():
        image.save()
    return path


def mask_is_empty(image: bpy.types.Image) -> bool:
    pixels = np.empty(len(image.pixels), dtype=np.float32)
    image.pixels.foreach_get(pixels)
    return float(pixels.reshape(-1, image.channels)[:, :3].max(initial=0.0)) <= 0.0


@persistent
def _save_masks(*_args: object) -> None:
    """Painted masks reach their files whenever the .blend is saved: nothing painted is lost."""
    for image in bpy.data.images:
        if image.get("dit360_role") == MASK_ROLE and image.is_dirty and image.packed_file is None:
            try:
                image.save()
            except RuntimeError:
                pass  # a folder gone read-only: the mask stays in memory, Regenerate Masked says so


def open_for_painting(context: bpy.types.Context, image: bpy.types.Image) -> bool:
    """Show `image` in an Image Editor in Paint mode, white brush; False when none is open."""
    found = False
    for window in context.window_manager.windows:
        for area in window.screen.areas if window.screen else ():
            if area.type != "IMAGE_EDITOR":
                continue
            space = area.spaces.active
            space.image = image
            space.ui_mode = "PAINT"
            area.tag_redraw()
            found = True
    _white_brush(context.tool_settings)
    return found


def _white_brush(tool_settings: bpy.types.ToolSettings) -> None:
    """Paint white by default (brushes are assets from Blender 4.3: some are not editable)."""
    for owner in (getattr(tool_settings, "unified_paint_settings", None),
                  getattr(getattr(tool_settings, "image_paint", None), "brush", None)):  # fmt: skip
        try:
            if owner is not None and hasattr(owner, "color"):
                owner.color = (1.0, 1.0, 1.0)
        except (AttributeError, RuntimeError, TypeError):
            pass  # a linked brush: the user picks the colour


# -- the job -------------------------------------------------------------------------------------


def start_edit(scene: bpy.types.Scene, edit: dict, **overrides: object) -> Generation:
    """Submit an edit of the scene's World with the panel's settings (`overrides` win) and the
    edit's own values `edit` (mask_kind, source, mask, strength, ...); returns at once like
    `Pump.start_generation`. Raises GenerationError when it can't be submitted."""
    if PUMP.busy:
        raise GenerationError("busy", "A world is already being generated.", "Wait for it, or press Cancel.")
    link = PUMP.link
    settings = scene.dit360
    seed = overrides.get("seed")
    if seed is None or (isinstance(seed, int) and seed < 0):
        seed = random.randint(0, MAX_SEED) if settings.randomize_seed else settings.seed
    link.check_python()
    out_dir = overrides.get("output_dir") or output.output_dir(settings)
    models_dir, model_paths = link.model_settings()
    values = scene_job_values(settings, overrides, skip=("seed", "output_dir"), job=EDIT)
    prompt = overrides.get("prompt") or scene.dit360_edit.prompt.strip() or values["prompt"]
    values["prompt"] = str(prompt).strip()
    try:
        job = Job(
            kind=EDIT, **values, **prefs_job_values(prefs()), seed=int(seed), output_dir=str(out_dir),
            models_dir=models_dir, model_paths=model_paths, loras=scene_loras(settings), **edit,
        )  # fmt: skip
        client = link.ensure_client()
        job_id = client.submit(job)
    except (ValueError, TypeError) as exc:  # ProtocolError: a value the worker would refuse
        raise GenerationError(
            getattr(exc, "code", "bad_parameters"),
            getattr(exc, "message", str(exc)),
            getattr(exc, "hint", ""),
        ) from None
    gen = Generation(job_id, PreviewWorld.of(scene), job.to_params(), client.log_path)
    gen.undo_message = f"DiT360: Edit World ({edit.get('mask_kind', 'mask')})"
    _reset_state(job_id, job.steps, starting=client.worker_pid is None)
    PUMP.job = gen
    link.note_busy()
    ensure_timer()
    tag_redraw()
    return gen


def edit_values(context: bpy.types.Context, kind: str) -> dict:
    """The edit's own parameters for `kind` from the Edit panel and the scene (GenerationError when
    the scene can't give them: no World image, no camera, an empty mask, no photo)."""
    scene = context.scene
    e = scene.dit360_edit
    values: dict = {"mask_kind": kind, "strength": float(e.strength), "feather": float(e.feather)}
    world = scene.world
    if kind == "photo":
        photo = bpy.path.abspath(e.photo.strip()) if e.photo.strip() else ""
        if not photo or not Path(photo).is_file():
            raise GenerationError(
                "bad_parameters", f"No photo file at '{e.photo}'.", "Choose the photo to extend."
            )
        values.update(photo=photo, hfov=float(e.photo_hfov) or None, yaw=float(e.yaw), pitch=float(e.pitch))
        values["strength"] = 1.0  # the rest is new: outpainted from noise
        return values
    values["source"] = str(source_file(world))
    if kind == "view":
        node = environment_node(world)
        mapping = world_mapping(world, node)
        region = getattr(context, "region_data", None)
        if region is None:  # pressed in the sidebar: the viewport's own view
            region = getattr(getattr(context, "space_data", None), "region_3d", None)
        if e.use_viewport and region is None:
            raise GenerationError(
                "bad_parameters", "There is no 3D viewport here to take the view from.",
                "Press Regenerate View in a 3D Viewport's sidebar, or turn Use Viewport off to use the camera.",
            )  # fmt: skip
        if e.use_viewport and region.view_perspective != "CAMERA":
            values.update(viewport_view(region, mapping))
        else:  # the scene camera (also when the viewport looks through it)
            values.update(camera_view(scene, scene.camera, mapping))
    elif kind == "mask":
        image = world_mask(world)
        if image is None:
            raise GenerationError(
                "bad_parameters", "This World has no painted mask.", "Press Paint Mask first."
            )
        if mask_is_empty(image):
            raise GenerationError(
                "bad_parameters", f"The mask '{image.name}' is black everywhere: nothing to regenerate.",
                "Paint white where the world should change.",
            )  # fmt: skip
        values["mask"] = str(save_mask(image))
    elif kind == "seam":
        values["band"] = float(e.band)
        values["strength"] = float(e.strength)
    return values


def parent_entry(scene: bpy.types.Scene, entry: bpy.types.PropertyGroup) -> bpy.types.PropertyGroup | None:
    """The History entry an edit was made from (its PNG is the edit's source), or None."""
    if not getattr(entry, "parent", ""):
        return None
    target = paths.resolve(entry.parent)
    return next((e for e in scene.dit360.history if e != entry and paths.resolve(e.filepath) == target), None)


# -- operators -----------------------------------------------------------------------------------


class _EditOperator(bpy.types.Operator):
    bl_options = {"REGISTER", "UNDO"}
    kind = "mask"

    wait: BoolProperty(name="Wait", default=False, options={"HIDDEN", "SKIP_SAVE"})

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if PUMP.busy:
            cls.poll_message_set("A world is being generated")
            return False
        return context.scene is not None

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            job = start_edit(context.scene, edit_values(context, self.kind))
        except GenerationError as err:
            state = runtime()
            if state is not None:
                state.error_code, state.error_message, state.error_hint = err.code, err.message, err.hint
                state.status = "Failed."
            self.report({"ERROR"}, f"{err.message} — {err.hint}" if err.hint else err.message)
            return {"CANCELLED"}
        if not (self.wait or bpy.app.background):
            return {"FINISHED"}
        job.push_undo = False  # this operator's own undo step holds the result
        PUMP.wait(job)
        if job.error is not None:
            self.report(
                {"ERROR"}, f"{job.error.message} — {job.error.hint}" if job.error.hint else job.error.message
            )
            return {"CANCELLED"}
        return {"FINISHED"}


class DIT360_OT_regenerate_view(_EditOperator):
    """Regenerate the part of the World the active camera (or the viewport) sees, with the Edit prompt"""

    bl_idname = "dit360.regenerate_view"
    bl_label = "Regenerate View"
    kind = "view"

    @classmethod
    def register(cls) -> None:
        # the Edit settings live on the Scene; the group is registered just before this class
        bpy.types.Scene.dit360_edit = PointerProperty(type=DIT360_EditSettings)
        if _save_masks not in bpy.app.handlers.save_pre:
            bpy.app.handlers.save_pre.append(_save_masks)

    @classmethod
    def unregister(cls) -> None:
        if _save_masks in bpy.app.handlers.save_pre:
            bpy.app.handlers.save_pre.remove(_save_masks)
        del bpy.types.Scene.dit360_edit


class DIT360_OT_regenerate_masked(_EditOperator):
    """Regenerate where the World's painted mask is white (grey: partly), with the Edit prompt"""

    bl_idname = "dit360.regenerate_masked"
    bl_label = "Regenerate Masked"
    kind = "mask"


class DIT360_OT_photo_to_panorama(_EditOperator):
    """Extend a perspective photo into a whole 360° world: the photo stays as it is, the rest is generated"""

    bl_idname = "dit360.photo_to_panorama"
    bl_label = "Photo to Panorama"
    kind = "photo"

    filepath: StringProperty(name="Photo", subtype="FILE_PATH", options={"SKIP_SAVE"})
    filter_image: BoolProperty(default=True, options={"HIDDEN", "SKIP_SAVE"})
    filter_folder: BoolProperty(default=True, options={"HIDDEN", "SKIP_SAVE"})

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        if context.scene.dit360_edit.photo.strip():
            return self.execute(context)
        context.window_manager.fileselect_add(self)  # no photo chosen yet: pick one
        return {"RUNNING_MODAL"}

    def execute(self, context: bpy.types.Context) -> set[str]:
        if self.filepath:
            context.scene.dit360_edit.photo = self.filepath
        return super().execute(context)


class DIT360_OT_repair_seam(_EditOperator):
    """Repair the World's 0°/360° seam: a band over it is regenerated, everything else stays"""

    bl_idname = "dit360.repair_seam"
    bl_label = "Repair Seam"
    kind = "seam"


class DIT360_OT_paint_mask(bpy.types.Operator):
    """Make a mask image for this World (black: keep) and open it for painting (white: regenerate)"""

    bl_idname = "dit360.paint_mask"
    bl_label = "Paint Mask"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context: bpy.types.Context) -> set[str]:
        world = context.scene.world
        if world is None:
            self.report({"ERROR"}, "The scene has no World: generate one first.")
            return {"CANCELLED"}
        try:
            image = ensure_mask(context.scene, world)
        except (OSError, RuntimeError) as exc:
            self.report({"ERROR"}, f"Could not write the mask image: {exc}. Choose another output folder.")
            return {"CANCELLED"}
        if not open_for_painting(context, image):
            self.report({"INFO"}, f"Mask '{image.name}' ready: open it in an Image Editor in Paint mode.")
        return {"FINISHED"}


CLASSES = (
    DIT360_EditSettings,
    DIT360_OT_regenerate_view,
    DIT360_OT_regenerate_masked,
    DIT360_OT_photo_to_panorama,
    DIT360_OT_repair_seam,
    DIT360_OT_paint_mask,
)
