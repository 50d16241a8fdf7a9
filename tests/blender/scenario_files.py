"""The life of a .blend with a generated World, in real Blender (bpy), in one process: save it, move
the project folder, save mid-job, pack, Make Paths Relative, Save As to another folder, append the
World into another file; each time the World must still be there and render the same.

    python tests/blender/scenario_files.py CONFIG.json      (CONFIG: see tests/test_blender_files.py)

Writes CONFIG["out"]: {step: {"ok", "error", "data", "seconds"}}; the pytest module asserts on it.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (sets BLENDER_USER_RESOURCES before bpy)

USER_RESOURCES = harness.USER_RESOURCES  # Blender's user folders for this run (a temporary one)

import bpy  # noqa: E402

CFG = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
WORK = Path(CFG["work"])
PROMPT = "This is a panorama image. A red desert canyon under a pale sky"
SMALL = {"width": 128, "height": 64}
FILE_PROPS = ("dit360_file", "dit360_png_file", "dit360_hdr_file", "dit360_lighting_file")  # our kept paths
TIMERS = harness.FakeTimers()
steps = harness.Steps(CFG["out"])
ctx: dict = {}


def mod(name: str):
    return sys.modules[f"{harness.MODULE}.blender.{name}"]


def api():
    return importlib.import_module(harness.MODULE + ".api")


def pump():
    return mod("pump").PUMP


def job_done() -> bool:
    return pump().job is not None and pump().job.done


def preview_seen() -> bool:
    job = pump().job
    return job is not None and (job.done or "preview" in job.events)


def shown_image():
    return mod("world").current_image(bpy.context.scene.world)


def image_record(image) -> dict:
    return {
        "name": image.name,
        "filepath": image.filepath,
        "packed": image.packed_file is not None,
        "kind": image.get("dit360_kind"),
        "size": list(image.size),
        "has_data": bool(image.has_data),
    }


def open_file(path: Path) -> None:
    bpy.ops.wm.open_mainfile(filepath=str(path))


def save_as(path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(path), **kwargs)


def render(name: str) -> list[float]:
    return harness.render_sphere_mean(str(WORK / "renders" / f"{name}.exr"))[0]


def suns() -> list[str]:
    return sorted(o.name for o in bpy.context.scene.objects if o.get("dit360_role") == "sun")


def history_records() -> list[dict]:
    return [{"filepath": e.filepath, "hdr": e.hdr_path, "lighting": e.lighting_path}
            for e in bpy.context.scene.dit360.history]  # fmt: skip


# -- steps ------------------------------------------------------------------------------------------


def step_install(data: dict) -> None:
    harness.install_zip(CFG["zip"])
    harness.configure(CFG["models"], CFG.get("worker_python"))


def step_move_project(data: dict) -> None:
    """Save, generate, save, move the project folder, reopen: the World and the history still work."""
    harness.reset_scene()
    harness.user_world()
    project = WORK / "project" / "scene.blend"
    save_as(project)
    image = api().generate_world(PROMPT, seed=5, steps=1, wait=True, timeout=180, **SMALL)
    data["image"] = image_record(image)
    data["image_props"] = {k: image[k] for k in image.keys() if k in FILE_PROPS}
    data["history"] = history_records()
    outside = WORK / "renders-elsewhere"
    chosen = api().generate_world(
        PROMPT, seed=6, steps=1, output_dir=str(outside), wait=True, timeout=180, **SMALL
    )
    data["outside"] = image_record(chosen)
    data["outside_history"] = history_records()[0]
    bpy.ops.dit360.apply_history(index=1)  # back to the first world, then save and move
    bpy.ops.wm.save_mainfile()
    moved = WORK / "moved-project"
    shutil.move(str(project.parent), str(moved))
    open_file(moved / "scene.blend")
    image = shown_image()
    image.reload()
    data["moved_image"] = image_record(image)
    data["moved_file"] = bpy.path.abspath(image.filepath)
    try:
        data["apply_history"] = sorted(bpy.ops.dit360.apply_history(index=1))
    except RuntimeError as exc:  # a reported error
        data["apply_history"] = [str(exc)]
    data["moved_after_apply"] = image_record(shown_image())


def step_save_mid_job(data: dict) -> None:
    """Ctrl+S while the previews show: the file holds the user's World; reopening it mid-job too."""
    harness.reset_scene()
    world = harness.user_world()
    before = mod("world").describe(world)
    blend = WORK / "midjob" / "scene.blend"
    save_as(blend)
    bpy.ops.dit360.generate(prompt=PROMPT, seed=7, steps=400, wait=False, **SMALL)
    TIMERS.pump(preview_seen, timeout=180)
    data["fake_user_mid_job"] = bpy.data.worlds["UserWorld"].use_fake_user
    bpy.ops.wm.save_mainfile()
    data["shown_after_save"] = bpy.context.scene.world.name  # the previews go on
    shown = pump().job.previews_shown
    TIMERS.pump(lambda: pump().job.previews_shown > shown or job_done(), timeout=120)
    data["previews_after_save"] = pump().job.previews_shown - shown
    old_job = pump().job
    open_file(blend)  # another file (this one, as saved) while the job runs
    data["job_after_open"] = pump().job is not None
    data["reopened_world"] = bpy.context.scene.world.name if bpy.context.scene.world else None
    data["reopened_worlds"] = sorted(w.name for w in bpy.data.worlds)
    data["reopened_images"] = sorted(i.name for i in bpy.data.images)
    data["reopened_unchanged"] = mod("world").describe(bpy.data.worlds.get("UserWorld")) == before
    data["reopened_fake_user"] = bpy.data.worlds["UserWorld"].use_fake_user
    # the old job was cancelled on the worker, which stays usable: the next job runs
    bpy.ops.dit360.generate(prompt=PROMPT, seed=8, steps=1, wait=False, **SMALL)
    TIMERS.pump(job_done, timeout=180)
    data["next_job_ok"] = pump().job.error is None and pump().job is not old_job
    data["worlds_after_next"] = sorted(w.name for w in bpy.data.worlds)


def _sun_result_in(folder: Path) -> dict:
    """The synthetic sun result (tests/test_blender_lighting.py) with its files copied into `folder`."""
    src = Path(CFG["results"]["A"]["folder"])
    shutil.copytree(src, folder)
    event = json.loads(Path(CFG["results"]["A"]["event"]).read_text(encoding="utf-8"))
    event["path"] = str(folder / Path(event["path"]).relative_to(src))
    event["files"] = {k: str(folder / Path(v).relative_to(src)) for k, v in event["files"].items()}
    return event


def _toggle_record() -> dict:
    world = bpy.context.scene.world
    world.dit360.use_sun = False
    off = {"kind": shown_image().get("dit360_kind"), "suns": suns(), "size": list(shown_image().size)}
    world.dit360.use_sun = True
    on = {"kind": shown_image().get("dit360_kind"), "suns": suns()}
    return {"off": off, "on": on}


def step_sun_after_pack(data: dict) -> None:
    """Pack Into .blend, delete the outputs, reopen: the Sun toggle still has both HDRs (defect 3);
    without the other file and unpacked, the sun stays a lamp."""
    harness.reset_scene()
    harness.user_world()
    blend = WORK / "packed" / "scene.blend"
    save_as(blend)
    event = _sun_result_in(blend.parent / "dit360")
    bpy.context.scene.dit360.pack_image = True
    mod("results").apply_result(bpy.context.scene, event, CFG["results"]["A"]["params"])
    data["fresh"] = _toggle_record()
    bpy.ops.wm.save_mainfile()
    shutil.rmtree(blend.parent / "dit360")  # outputs deleted (or the project sent without them)
    open_file(blend)
    data["packed_images"] = sorted(
        i.get("dit360_kind", "") for i in bpy.data.images if i.packed_file is not None
    )
    data["reopened"] = _toggle_record()
    # not packed, and the sun-in-the-map file gone: the toggle keeps the lamp
    harness.reset_scene()
    harness.user_world()
    event = _sun_result_in(WORK / "unpacked")
    mod("results").apply_result(bpy.context.scene, event, CFG["results"]["A"]["params"])
    world = bpy.context.scene.world
    if "other_hdr" in world.dit360.bl_rna.properties:
        world.dit360.other_hdr = None  # the World keeps no copy of it either
    Path(event["files"]["hdr"]).unlink()
    world.dit360.use_sun = False
    data["hdr_missing_off"] = {"kind": shown_image().get("dit360_kind"), "suns": suns()}
    world.dit360.use_sun = True


def step_artist_paths(data: dict) -> None:
    """Make Paths Relative, Save As to another folder, Pack Resources with the outputs gone, Append the
    World into another file: the sphere renders the same each time."""
    harness.reset_scene()
    harness.sphere_scene("CYCLES")
    blend = WORK / "art" / "scene.blend"
    save_as(blend)
    api().generate_world(PROMPT, seed=9, steps=2, wait=True, timeout=180, **SMALL)
    ctx["art_world"] = bpy.context.scene.world.name
    bpy.ops.wm.save_mainfile()
    renders = {"reference": render("reference")}
    bpy.ops.file.make_paths_absolute()
    bpy.ops.file.make_paths_relative()
    renders["relative"] = render("relative")
    data["relative_path"] = shown_image().filepath
    other = WORK / "elsewhere" / "deeper" / "copy.blend"
    save_as(other)
    open_file(other)
    renders["save_as"] = render("save_as")
    data["save_as_path"] = shown_image().filepath
    data["save_as_history"] = [Path(bpy.path.abspath(e["filepath"])).is_file() for e in history_records()]
    try:
        data["save_as_apply_history"] = sorted(bpy.ops.dit360.apply_history(index=0))
    except RuntimeError as exc:
        data["save_as_apply_history"] = [str(exc)]
    bpy.ops.file.pack_all()
    bpy.ops.wm.save_mainfile()
    shutil.move(str(blend.parent / "dit360"), str(WORK / "art-outputs-gone"))
    open_file(other)
    renders["packed"] = render("packed")
    data["packed"] = shown_image().packed_file is not None
    target = WORK / "another" / "another.blend"
    harness.reset_scene()
    harness.sphere_scene("CYCLES")
    save_as(target)
    world_name = ctx["art_world"]
    names = {w.name for w in bpy.data.worlds}
    bpy.ops.wm.append(directory=str(other) + "/World/", filename=world_name)
    appended = next((w for w in bpy.data.worlds if w.name not in names), None)
    data["appended"] = appended is not None and mod("world").has_chain(appended)
    bpy.context.scene.world = appended
    renders["appended"] = render("appended")
    data["renders"] = renders


ORDER = [
    ("install", step_install),
    ("move_project", step_move_project),
    ("save_mid_job", step_save_mid_job),
    ("sun_after_pack", step_sun_after_pack),
    ("artist_paths", step_artist_paths),
]

if __name__ == "__main__":
    only = set(CFG.get("only") or [])
    for name, fn in ORDER:
        if only and name not in only and name != "install":
            continue
        if name != "install" and not steps.results.get("install", {}).get("ok"):
            steps.results[name] = {"ok": False, "error": "install failed", "data": {}, "seconds": 0}
            continue
        steps.run(name, fn)
    for fn in list(TIMERS.due):  # leave no timer behind: bpy 4.5 can hang at exit with one registered
        TIMERS.unregister(fn)
    bpy.app.timers.register, bpy.app.timers.unregister, bpy.app.timers.is_registered = TIMERS._real
    steps.save()
    sys.stdout.flush()
    os._exit(0)  # skip Blender's atexit add-on teardown (already done) and its slow exit
