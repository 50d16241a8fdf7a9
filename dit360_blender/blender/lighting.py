"""The HDR environment and the Sun lamp: how a generated world lights the scene.

The worker writes, next to every PNG, `<stem>.hdr` (linear float, the sun in the map) and
`<stem>_lighting.hdr` (the sun's core clamped to the sky around it), and records in the metadata the
exposure and, when it found a sun, the Sun lamp that gives back what was clamped (panorama/hdr.py).

* When a sun was found, the World's *Sun Lamp* toggle decides how the sun lights the scene, once:
  on, as our Sun lamp (real shadows in Eevee and Cycles) with `_lighting.hdr` (the sun clamped);
  off, from the map, with `.hdr`. The World keeps the HDR it does not show (`other_hdr`: saved,
  packed and appended with it); when that one cannot be had, the toggle keeps the lamp, so the sun
  is never lost. With no sun found the two HDRs are the same and the World shows `.hdr`. Without
  HDR files (or for an image of the user's) the World shows that image at exposure 1 and there is
  no Sun. Where the worker also wrote the OpenEXR copies (`<stem>.exr`, `<stem>_lighting.exr`),
  the World loads those instead of the `.hdr` of the same kind.
* The Sun object is ours: tagged with the custom property ``dit360_role = "sun"``, one per scene
  (each scene that uses the World), linked to the scene's master collection, reconfigured when the
  environment changes and removed when the World shows the sun in its map or has none. Lights
  without the tag are never touched.
* It follows the World's rotation through a driver on its Z rotation that reads the DiT360 Mapping
  node's Z rotation, so a manual edit of the node counts too (renders always evaluate it; the Rotation
  control also refreshes the viewport at once). The Mapping node rotates the lookup vector, so turning
  it by +θ turns what the World shows by −θ about Z: the driver is ``azimuth − rot``, a simple
  expression that Blender evaluates without running Python (no "Auto Run Scripts" needed).
* Strength: the lamp gives back the irradiance clamped out of the map at the Background strength in
  use (exposure × Strength), times the *Sun Strength* multiplier; colour and angular size (``angle``,
  soft shadows in Cycles and EEVEE) are the detected sun's; shadows are on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import bpy

from . import output
from . import world as world_nodes

ROLE = world_nodes.ROLE
SUN_ROLE = "sun"
SUN_NAME = "DiT360 Sun"
WORLD_TAG = "dit360_world"  # the World a Sun belongs to (by name)
SUN_LOCATION = (0.0, 0.0, 5.0)  # where a new Sun appears (a Sun's position does not matter)


# -- which image the World shows ----------------------------------------------------------------------


def _wanted_kind(world: bpy.types.World, lighting: dict | None) -> str:
    """The kind of HDR to show: "lighting" (the sun clamped, our lamp gives it back) when there is a
    sun and the Sun Lamp toggle is on; "hdr" (the sun in the map) otherwise, so the sun always
    lights the scene once, as a lamp or from the map."""
    if isinstance(lighting, dict) and lighting.get("sun_lamp") and world.dit360.use_sun:
        return "lighting"
    return "hdr"


def _other(kind: str) -> str:
    return "hdr" if kind == "lighting" else "lighting"


def apply_result(world: bpy.types.World, event: dict, pack: bool = False) -> bpy.types.Image:
    """Load a worker result (its `path`, `files` and `metadata`) and show it in `world`'s chain.

    The HDR that suits the Sun toggle is loaded (float, linear); the PNG only when no HDR was written.
    The image gets the metadata as custom properties (`dit360_seam`, `dit360_lighting`, …) and the
    paths of its sibling files, so the toggle and the panel work from the image alone. When a sun was
    found, the other HDR is loaded too and kept by the World (`other_hdr`), so the toggle can switch
    to it after a pack, a move or a deleted output folder. The Sun object is not touched here
    (`sync_sun` does it once the scene uses the World). Raises FileNotFoundError when none of the
    files exists."""
    metadata = event.get("metadata") or {}
    files = {k: str(v) for k, v in (event.get("files") or {}).items() if k in ("hdr", "lighting") and v}
    files.update(_exr_copies(files))
    files["png"] = str(event["path"])
    present = {k for k, v in files.items() if Path(v).is_file()}
    wanted = _wanted_kind(world, metadata.get("lighting"))
    kinds = [k for k in (wanted, _other(wanted), "png") if k in present]
    if not kinds:
        raise FileNotFoundError(f"{files['png']} (and its .hdr files) are missing")
    image = output.load_result(files[kinds[0]], metadata, pack=pack)
    output.tag_environment(image, kinds[0], files)
    other = None
    if kinds[0] != "png" and _other(kinds[0]) in present and (metadata.get("lighting") or {}).get("sun_lamp"):
        other = output.load_result(files[_other(kinds[0])], metadata, pack=pack)
        output.tag_environment(other, _other(kinds[0]), files)
    world.dit360.other_hdr = other
    world_nodes.set_image(world, image)
    world_nodes.sync_controls(world)  # the same image reloaded may come with a new exposure
    return image


def _exr_copies(files: dict[str, str]) -> dict[str, str]:
    """The half-float OpenEXR written beside each .hdr (same stem), where it exists: the World loads
    it instead (finer than RGBE, what other tools expect), under the same kind. Found on disk, not
    in the event, so a history entry (which records the .hdr paths) gets the EXR too."""
    copies = {kind: str(Path(path).with_suffix(".exr")) for kind, path in files.items()}
    return {kind: path for kind, path in copies.items() if Path(path).is_file()}


def _same_panorama(a: bpy.types.Image, b: bpy.types.Image) -> bool:
    key = output.FILE_KEYS["png"]
    return a.get(key) is not None and a.get(key) == b.get(key)


def _sibling(world: bpy.types.World, image: bpy.types.Image, kind: str) -> bpy.types.Image | None:
    """The other HDR of the same panorama: the one the World keeps (packed or not), else loaded
    again from its file; None when neither exists."""
    kept = world.dit360.other_hdr
    if kept is not None and kept.get(output.KIND) == kind and _same_panorama(kept, image):
        sibling = kept
    else:
        path = output.sibling_file(image, kind)
        if path is None or not Path(path).is_file():
            return None
        sibling = bpy.data.images.load(path, check_existing=True)
        for key in image.keys():
            if key.startswith(output.META_PREFIX) and key not in sibling.keys():
                sibling[key] = image[key]
        sibling[output.KIND] = kind
        sibling[output.META_PREFIX + "file"] = image[output.FILE_KEYS[kind]]
    if image.packed_file is not None and sibling.packed_file is None:
        sibling.pack()
    return sibling


def refresh(world: bpy.types.World) -> None:
    """After the Sun toggle changed: show the HDR that goes with it (the World keeps the other one)
    and add or remove the Sun in every scene that uses `world`. When that HDR cannot be had, the
    World keeps its image and the scenes their Sun: the sun is never lost."""
    image = world_nodes.current_image(world)
    kind = image.get(output.KIND) if image is not None else None
    if kind in ("hdr", "lighting"):
        wanted = _wanted_kind(world, output.environment_lighting(image))
        if wanted != kind:
            sibling = _sibling(world, image, wanted)
            if sibling is not None:
                world_nodes.set_image(world, sibling)
                world.dit360.other_hdr = image
    sync_suns(world)


def sync_suns(world: bpy.types.World) -> None:
    """Every scene that uses `world` gets the Sun its environment asks for (or loses ours)."""
    for scene in scenes_using(world):
        sync_sun(scene, world, create=True)


def scenes_using(world: bpy.types.World) -> list[bpy.types.Scene]:
    return [scene for scene in bpy.data.scenes if scene.world == world]


# -- the Sun object -------------------------------------------------------------------------------------


def lamp_settings(world: bpy.types.World | None) -> dict | None:
    """The Sun lamp the World's environment asks for (None: no Sun), at the strengths set now.

    An environment showing `_lighting.hdr` (a sun was found and clamped out of the map) has one,
    whatever the toggle says: that map lacks its sun, which only the lamp gives back."""
    if world is None:
        return None
    image = world_nodes.current_image(world)
    if image is None or image.get(output.KIND) != "lighting":
        return None
    lighting = output.environment_lighting(image) or {}
    lamp = lighting.get("sun_lamp")
    if not isinstance(lamp, dict):
        return None
    # sun_lamp() was computed at world strength = exposure: the lamp scales with the Background strength.
    irradiance = [float(x) for x in lighting.get("sun_irradiance_rgb") or ()]
    per_unit = max(irradiance) if irradiance else float(lamp["strength"]) / output.exposure(image)
    return {
        "direction": [float(x) for x in lamp["direction"]],
        "rotation_euler": [float(x) for x in lamp["rotation_euler"]],
        "color": [float(x) for x in lamp["color"]],
        "angle": float(lamp["angle"]),
        "strength": world_nodes.background_strength(world) * per_unit * world.dit360.sun_strength,
    }


def our_suns(scene: bpy.types.Scene) -> list[bpy.types.Object]:
    """The scene's objects that carry our tag (ours, whatever they were renamed to)."""
    return [obj for obj in scene.objects if obj.get(ROLE) == SUN_ROLE]


def remove_sun(obj: bpy.types.Object) -> None:
    data = obj.data
    bpy.data.objects.remove(obj, do_unlink=True)
    if data is not None and data.users == 0 and data.get(ROLE) == SUN_ROLE:
        bpy.data.lights.remove(data)


def sync_sun(scene: bpy.types.Scene, world: bpy.types.World, create: bool = True) -> bpy.types.Object | None:
    """Make the scene's Sun match `world`'s environment: configured (created when `create`), or removed
    when the environment has none. Returns the Sun or None."""
    settings = lamp_settings(world)
    suns = our_suns(scene)
    if settings is None:
        for obj in suns:
            remove_sun(obj)
        return None
    if not suns and not create:
        return None
    for extra in suns[1:]:  # one Sun per scene
        remove_sun(extra)
    obj = suns[0] if suns else _new_sun(scene)
    _configure(obj, world, settings)
    return obj


def update_suns(world: bpy.types.World) -> None:
    """After a World control changed (rotation, strengths): update the Suns that exist, add none."""
    for scene in scenes_using(world):
        sync_sun(scene, world, create=False)


def _new_sun(scene: bpy.types.Scene) -> bpy.types.Object:
    data = bpy.data.lights.new(SUN_NAME, type="SUN")
    data[ROLE] = SUN_ROLE
    obj = bpy.data.objects.new(SUN_NAME, data)
    obj[ROLE] = SUN_ROLE
    obj.location = SUN_LOCATION
    scene.collection.objects.link(obj)
    return obj


def _configure(obj: bpy.types.Object, world: bpy.types.World, settings: dict) -> None:
    light = obj.data
    if light is None or light.type != "SUN":
        return  # the user turned our object into something else: leave it as it is
    _set_value(light, "energy", settings["strength"])
    _set_value(light, "angle", settings["angle"])
    if [round(c, 6) for c in light.color] != [round(c, 6) for c in settings["color"]]:
        light.color = settings["color"]
    if not light.use_shadow:
        light.use_shadow = True
    if obj.get(WORLD_TAG) != world.name:
        obj[WORLD_TAG] = world.name
    x, y, azimuth = settings["rotation_euler"]
    if obj.rotation_mode != "XYZ":
        obj.rotation_mode = "XYZ"
    for axis, value in ((0, x), (1, y)):
        if abs(obj.rotation_euler[axis] - value) > 1e-7:
            obj.rotation_euler[axis] = value
    _drive_rotation(obj, world, azimuth)
    # A driver reading a node socket is not re-run when Python or the UI sets the socket; renders build
    # their own depsgraph and always are. Tagging the object re-runs it for the viewport now.
    obj.update_tag(refresh={"OBJECT"})


def _set_value(owner: bpy.types.ID, name: str, value: float) -> None:
    if abs(getattr(owner, name) - value) > 1e-6 * max(1.0, abs(value)):
        setattr(owner, name, value)


def mapping_rotation_path(world: bpy.types.World) -> str | None:
    """The RNA path (from the World) of the DiT360 Mapping node's Z rotation, or None."""
    mapping = world_nodes.our_nodes(world).get("mapping")
    if mapping is None:
        return None
    name = bpy.utils.escape_identifier(mapping.name)
    return f'node_tree.nodes["{name}"].inputs["Rotation"].default_value[2]'


def _drive_rotation(obj: bpy.types.Object, world: bpy.types.World, azimuth: float) -> None:
    """rotation_euler.z = azimuth − (the Mapping node's Z rotation), as a driver."""
    path = mapping_rotation_path(world)
    fcurve = obj.animation_data.drivers.find("rotation_euler", index=2) if obj.animation_data else None
    if path is None:  # no Mapping node: a fixed rotation from the control
        if fcurve is not None:
            obj.driver_remove("rotation_euler", 2)
        obj.rotation_euler[2] = azimuth - world.dit360.rotation
        return
    expression = f"{azimuth:.9f} - rot"
    if fcurve is None:
        fcurve = obj.driver_add("rotation_euler", 2)
    driver = fcurve.driver
    variables = driver.variables
    var = variables[0] if len(variables) == 1 else None
    target = var.targets[0] if var is not None else None
    if (
        driver.type == "SCRIPTED"
        and driver.expression == expression
        and var is not None
        and var.name == "rot"
        and var.type == "SINGLE_PROP"
        and target.id_type == "WORLD"
        and target.id == world
        and target.data_path == path
    ):
        return
    driver.type = "SCRIPTED"
    while len(variables):
        variables.remove(variables[0])
    var = variables.new()
    var.name = "rot"
    var.type = "SINGLE_PROP"
    var.targets[0].id_type = "WORLD"
    var.targets[0].id = world
    var.targets[0].data_path = path
    driver.expression = expression
    obj.rotation_euler[2] = azimuth - _mapping_z(world)


def _mapping_z(world: bpy.types.World) -> float:
    mapping = world_nodes.our_nodes(world).get("mapping")
    if mapping is None:
        return world.dit360.rotation
    return float(mapping.inputs["Rotation"].default_value[2])


# -- what the panel and the history show ----------------------------------------------------------------


def seam_text(seam: dict | None) -> tuple[str, bool | None]:
    """("Seam: z 1.2 · no visible seam", ok) or ("", None) when there is no seam score."""
    if not isinstance(seam, dict) or not isinstance(seam.get("seam_z"), (int, float)):
        return "", None
    ok = bool(seam.get("seam_ok"))
    verdict = "no visible seam" if ok else "visible seam at the 0°/360° wrap"
    return f"Seam: z {seam['seam_z']:.1f} · {verdict}", ok


def sun_text(lighting: dict | None, rotation: float = 0.0) -> tuple[str, bool | None]:
    """("Sun: azimuth …°, elevation …°, …° wide", True), ("No sun: <why>", False), or ("", None).

    The azimuth is where the sun is in the scene: counter-clockwise from +X seen from above, after the
    World's rotation (`rotation`, radians, the Mapping node's Z)."""
    detection = lighting.get("sun") if isinstance(lighting, dict) else None
    if not isinstance(detection, dict):
        return "", None
    sun = detection.get("sun")
    if detection.get("found") and isinstance(sun, dict):
        azimuth = (sun["azimuth_deg"] - math.degrees(rotation) + 180.0) % 360.0 - 180.0
        return (
            f"Sun: azimuth {azimuth:.0f}°, elevation {sun['elevation_deg']:.0f}°, "
            f"{sun['diameter_deg']:.1f}° wide",
            True,
        )
    reason = str(detection.get("reason") or "none found")
    if reason.lower().startswith("no sun:"):
        reason = reason[len("no sun:") :].strip()
    return f"No sun: {reason}", False


def describe_environment(world: bpy.types.World | None) -> dict:
    """What the panel shows about the World's current environment (from its image's properties)."""
    image = world_nodes.current_image(world) if world is not None else None
    if image is None:
        return {"image": None}
    lighting = output.environment_lighting(image)
    seam, seam_ok = seam_text(output.read_json(image, "seam"))
    sun, found = sun_text(lighting, _mapping_z(world))
    return {
        "image": image.name,
        "kind": image.get(output.KIND, ""),
        "is_float": bool(image.is_float),
        "seam": seam,
        "seam_ok": seam_ok,
        "sun": sun,
        "sun_found": found,
        "exposure": output.exposure(image),
        "has_lamp": bool(lighting and lighting.get("sun_lamp")),
    }


def compact_json(data: dict | None, drop: tuple[str, ...] = ()) -> str:
    """JSON for a history entry: the analysis without the bulky candidate list."""
    if not isinstance(data, dict):
        return ""
    data = {k: v for k, v in data.items() if k not in drop}
    sun = data.get("sun")
    if isinstance(sun, dict) and "candidates" in sun:
        data["sun"] = {k: v for k, v in sun.items() if k != "candidates"}
    return json.dumps(data, separators=(",", ":"))
