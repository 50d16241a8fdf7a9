"""The extension in real Blender (bpy), end to end, in one process: install the built zip, register
twice, generate through the operator with a driven timer, undo, render, the scripting API, the
failure paths, preferences (dependencies, models), history, panels, unregister.

    python tests/blender/scenario_main.py CONFIG.json      (CONFIG: see tests/test_blender_extension.py)

Writes CONFIG["out"]: {step: {"ok", "error", "data", "seconds"}}; the pytest module asserts on it.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (sets BLENDER_USER_RESOURCES before bpy)
from harness import FakeTimers, Steps, addon_prefs, configure, install_zip, reset_scene, user_world  # noqa: E402

USER_RESOURCES = harness.USER_RESOURCES  # Blender's user folders for this run (a temporary one)

import bpy  # noqa: E402

CFG = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
WORK = Path(CFG["work"])
PROMPT = "This is a panorama image. A red desert canyon under a pale sky"
SMALL = {"width": 128, "height": 64}
# The worker's Python: this one (the dev venv has torch) unless the config names another, e.g. when
# this scenario runs under a bpy 5.x venv that has no torch.
WORKER_PY = CFG.get("worker_python") or sys.executable
TIMERS = FakeTimers()
steps = Steps(CFG["out"])
ctx: dict = {}


def ext():
    return sys.modules[harness.MODULE]


def ctrl():
    return sys.modules[harness.MODULE + ".blender.pump"].PUMP


def thumbnails():
    return sys.modules[harness.MODULE + ".blender.thumbnails"].THUMBNAILS.collection


def wm_state():
    return bpy.context.window_manager.dit360


def describe(world):
    return sys.modules[harness.MODULE + ".blender.world"].describe(world)


def job_done():
    return ctrl().job is not None and ctrl().job.done


# -- install, register ------------------------------------------------------------------------------


def step_install(data: dict) -> None:
    import addon_utils
    from bl_pkg import bl_extension_cli

    data["validate_rc"] = bl_extension_cli.cli_extension_handler(["validate", CFG["zip"]])
    t0 = time.monotonic()
    module = install_zip(CFG["zip"])
    data["install_s"] = time.monotonic() - t0
    data["module"] = module.__name__
    data["file"] = module.__file__
    data["check"] = list(addon_utils.check(harness.MODULE))
    data["has_register"] = callable(getattr(module, "register", None))
    cycles = []
    for _ in range(2):  # register/unregister twice in a row
        bpy.ops.preferences.addon_disable(module=harness.MODULE)
        off = (hasattr(bpy.types, "DIT360_PT_main"), _op_exists())
        bpy.ops.preferences.addon_enable(module=harness.MODULE)
        on = (hasattr(bpy.types, "DIT360_PT_main"), _op_exists())
        cycles.append({"off": off, "on": on})
    data["cycles"] = cycles
    data["scene_prop"] = hasattr(bpy.types.Scene, "dit360")
    data["wm_prop"] = hasattr(bpy.types.WindowManager, "dit360")
    data["prefs_idname"] = type(addon_prefs()).bl_idname
    data["torch_loaded"] = "torch" in sys.modules
    data["blender"] = [list(bpy.app.version), list(sys.version_info[:2])]
    data["user_dir"] = str(bpy.utils.extension_path_user(harness.MODULE, path="", create=False))


def _op_exists() -> bool:
    try:
        bpy.ops.dit360.generate.get_rna_type()
        return True
    except (AttributeError, KeyError):
        return False


# -- generate through the operator with the driven timer --------------------------------------------


def step_generate(data: dict) -> None:
    configure(CFG["models"], WORKER_PY)
    reset_scene()
    world = user_world()
    # Blender's UI starts every file with an undo step holding its loaded state; the bpy module pushes
    # none by itself (nor for operators called from Python), so the test makes that first step.
    bpy.ops.ed.undo_push(message="Original")
    ctx["before"] = describe(world)
    scene = bpy.context.scene
    seen_worlds, states = set(), []

    def on_tick() -> None:
        s = wm_state()
        states.append((s.stage, s.step, round(s.progress, 4), s.running))
        seen_worlds.add(scene.world.name if scene.world else None)

    t0 = time.monotonic()
    result = bpy.ops.dit360.generate(prompt=PROMPT, seed=4242, steps=3, wait=False, **SMALL)
    data["operator_returned_s"] = time.monotonic() - t0
    data["operator_result"] = sorted(result)
    data["running_after_call"] = wm_state().running
    data["timer_registered"] = len(TIMERS.due)
    TIMERS.pump(job_done, timeout=180, on_tick=on_tick)
    data["job_s"] = time.monotonic() - t0
    job = ctrl().job
    data["error"] = None if job.error is None else [job.error.code, job.error.message, job.error.hint]
    data["events"] = job.events
    data["previews_shown"] = job.previews_shown
    data["progress_log"] = job.progress_log
    data["wm_states"] = states
    data["seen_worlds"] = sorted(w or "" for w in seen_worlds)
    world = bpy.data.worlds["UserWorld"]
    data["scene_world"] = scene.world.name
    data["after"] = describe(world)
    ours = sys.modules[harness.MODULE + ".blender.world"].our_nodes(world)
    env = ours["env"]
    image = env.image
    data["chain"] = {role: n.bl_idname for role, n in ours.items()}
    data["links"] = data["after"]["links"]
    data["image"] = {
        "name": image.name,
        "filepath": bpy.path.abspath(image.filepath),
        "size": list(image.size),
        "props": {k: image[k] for k in image.keys() if k.startswith("dit360_")},
        "exists": Path(bpy.path.abspath(image.filepath)).is_file(),
    }
    data["world_props"] = {k: world[k] for k in world.keys() if k.startswith(("dit360_", "user_"))}
    data["leftover_worlds"] = sorted(w.name for w in bpy.data.worlds)
    data["leftover_images"] = sorted(i.name for i in bpy.data.images)
    h = scene.dit360.history
    data["history"] = [
        {"prompt": e.prompt, "seed": e.seed, "steps": e.steps, "filepath": e.filepath} for e in h
    ]
    s = wm_state()
    data["wm_final"] = {"running": s.running, "stage": s.stage, "progress": s.progress, "status": s.status,
                        "error": s.error_message, "job_id": s.job_id}  # fmt: skip
    data["panel_seed"] = scene.dit360.seed
    data["timers_left"] = [getattr(f, "__name__", str(f)) for f in TIMERS.due]
    ctx["first_image"] = image.name
    ctx["first_path"] = data["image"]["filepath"]


def step_undo(data: dict) -> None:
    world = bpy.data.worlds["UserWorld"]
    data["before_undo_has_chain"] = _has_chain(world)
    data["undo"] = sorted(bpy.ops.ed.undo())
    world = bpy.data.worlds["UserWorld"]
    data["after_undo"] = describe(world)
    data["equal_to_before"] = data["after_undo"] == ctx["before"]
    data["scene_world"] = bpy.context.scene.world.name if bpy.context.scene.world else None
    data["redo"] = sorted(bpy.ops.ed.redo())
    data["after_redo_has_chain"] = _has_chain(bpy.data.worlds["UserWorld"])


def _has_chain(world) -> bool:
    return sys.modules[harness.MODULE + ".blender.world"].has_chain(world)


# -- the scripting API, in a saved file (//dit360/), regeneration reuses the chain ------------------


def step_api(data: dict) -> None:
    api = importlib.import_module(harness.MODULE + ".api")
    blend = WORK / "saved" / "scene.blend"
    blend.parent.mkdir(parents=True, exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    world = bpy.data.worlds["UserWorld"]
    nodes_before = describe(world)["nodes"]
    bpy.context.scene.dit360.pack_image = True
    t0 = time.monotonic()
    image = api.generate_world(PROMPT, seed=7, steps=2, wait=True, timeout=120, **SMALL)
    data["seconds"] = time.monotonic() - t0
    data["returned"] = type(image).__name__
    data["image"] = image.name
    data["filepath"] = bpy.path.abspath(image.filepath)
    data["expected_dir"] = str((blend.parent / "dit360").resolve())
    data["packed"] = image.packed_file is not None
    world = bpy.data.worlds["UserWorld"]
    after = describe(world)["nodes"]
    data["same_nodes"] = sorted(after) == sorted(nodes_before)
    data["changed_nodes"] = sorted(
        name for name in after if after[name] != nodes_before.get(name)
    )  # only the Environment Texture's image should differ
    data["env_image"] = sys.modules[harness.MODULE + ".blender.world"].current_image(world).name
    data["seed_prop"] = image.get("dit360_seed")
    data["history_len"] = len(bpy.context.scene.dit360.history)
    bpy.context.scene.dit360.pack_image = False
    # a scene without a World gets one
    scene2 = bpy.data.scenes.new("NoWorld")
    scene2.world = None
    image2 = api.generate_world(PROMPT, seed=8, steps=1, scene=scene2, wait=True, timeout=120, **SMALL)
    data["new_world"] = scene2.world.name if scene2.world else None
    data["new_world_image"] = sys.modules[harness.MODULE + ".blender.world"].current_image(scene2.world).name
    data["image2"] = image2.name
    bpy.data.scenes.remove(scene2)
    # bpy.ops in background mode blocks by default (timers never run there)
    t0 = time.monotonic()
    custom = WORK / "custom-out"
    result = bpy.ops.dit360.generate(prompt=PROMPT, seed=9, steps=1, output_dir=str(custom), **SMALL)
    data["op_blocking_result"] = sorted(result)
    data["custom_out"] = sorted(q.name for q in custom.iterdir()) if custom.is_dir() else []
    data["op_blocking_done"] = job_done() and ctrl().job.error is None
    data["op_blocking_s"] = time.monotonic() - t0


# -- failure paths ----------------------------------------------------------------------------------


def _fresh_world_scene():
    reset_scene()
    world = user_world()
    return world, describe(world)


def _run_until(predicate, timeout=120.0):
    TIMERS.pump(predicate, timeout=timeout)


def _preview_seen() -> bool:
    job = ctrl().job
    return job is not None and (job.done or (job.preview.world() is not None and "preview" in job.events))


def _failure_record(data: dict, before: dict) -> None:
    world = bpy.data.worlds["UserWorld"]
    job = ctrl().job
    data["error"] = None if job.error is None else {"code": job.error.code, "message": job.error.message,
                                                    "hint": job.error.hint}  # fmt: skip
    data["world_unchanged"] = describe(world) == before
    data["scene_world"] = bpy.context.scene.world.name if bpy.context.scene.world else None
    data["worlds"] = sorted(w.name for w in bpy.data.worlds)
    data["images"] = sorted(i.name for i in bpy.data.images)
    s = wm_state()
    data["wm"] = {"running": s.running, "stage": s.stage, "status": s.status, "error_code": s.error_code,
                  "error_message": s.error_message, "error_hint": s.error_hint}  # fmt: skip


def step_cancel(data: dict) -> None:
    world, before = _fresh_world_scene()
    bpy.ops.dit360.generate(prompt=PROMPT, seed=1, steps=400, wait=False, **SMALL)
    _run_until(_preview_seen)
    data["preview_world_in_use"] = bpy.context.scene.world.name
    world_mod = sys.modules[harness.MODULE + ".blender.world"]
    data["preview_world_image"] = world_mod.current_image(bpy.context.scene.world).name
    job = ctrl().job
    # the panel's live thumbnail (icon ids stay 0 without a UI, so its pixels are checked)
    data["preview_thumbnail"] = list(thumbnails()[job.preview_key].image_size) if job.preview_key else None
    data["cancel_op"] = sorted(bpy.ops.dit360.cancel())
    t0 = time.monotonic()
    _run_until(job_done)
    data["cancel_latency_s"] = time.monotonic() - t0
    _failure_record(data, before)


def step_file_load_mid_job(data: dict) -> None:
    _fresh_world_scene()
    bpy.ops.dit360.generate(prompt=PROMPT, seed=12, steps=400, wait=False, **SMALL)
    _run_until(_preview_seen)
    old = ctrl().job.job_id
    reset_scene()  # loading a file while a job runs: the job belongs to the old file
    data["job_after_load"] = None if ctrl().job is None else ctrl().job.job_id
    data["running_after_load"] = wm_state().running
    data["worlds_after_load"] = sorted(w.name for w in bpy.data.worlds)
    bpy.ops.dit360.generate(prompt=PROMPT, seed=13, steps=1, wait=False, **SMALL)
    _run_until(job_done)
    job = ctrl().job
    data["next_job_ok"] = job.job_id != old and job.error is None and bpy.context.scene.world is not None


def step_worker_killed(data: dict) -> None:
    world, before = _fresh_world_scene()
    bpy.ops.dit360.generate(prompt=PROMPT, seed=2, steps=400, wait=False, **SMALL)
    _run_until(_preview_seen)
    pid = ctrl().link.client.worker_pid
    data["killed_pid"] = pid
    os.kill(pid, signal.SIGKILL)
    _run_until(job_done)
    _failure_record(data, before)


def step_missing_weights(data: dict) -> None:
    world, before = _fresh_world_scene()
    empty = WORK / "empty-models"
    empty.mkdir(exist_ok=True)
    addon_prefs().models_dir = str(empty)
    bpy.ops.dit360.generate(prompt=PROMPT, seed=3, steps=2, wait=False, **SMALL)
    _run_until(job_done)
    _failure_record(data, before)
    addon_prefs().models_dir = CFG["models"]


def step_missing_dependencies(data: dict) -> None:
    world, before = _fresh_world_scene()
    p = addon_prefs()
    p.python_path = CFG["python_without_torch"]
    bpy.ops.dit360.generate(prompt=PROMPT, seed=4, steps=2, wait=False, **SMALL)
    _run_until(job_done)
    _failure_record(data, before)
    # a Python that does not exist is refused before anything starts
    p.python_path = str(WORK / "no-such-python")
    try:
        result = bpy.ops.dit360.generate(prompt=PROMPT, seed=5, steps=2, wait=False, **SMALL)
    except RuntimeError as exc:  # reported errors surface as RuntimeError in bpy.ops
        result = {"RuntimeError"}
        data["nonexistent_report"] = str(exc)
    data["nonexistent_result"] = sorted(result)
    s = wm_state()
    data["nonexistent_wm"] = {"code": s.error_code, "message": s.error_message, "hint": s.error_hint}
    data["nonexistent_world_unchanged"] = describe(bpy.data.worlds["UserWorld"]) == before
    p.python_path = WORKER_PY
    data["torch_loaded"] = "torch" in sys.modules


# -- rendering: the generated World lights the scene -------------------------------------------------


def step_render_cycles(data: dict) -> None:
    configure(CFG["models"], WORKER_PY)
    reset_scene()
    harness.sphere_scene("CYCLES")
    api = importlib.import_module(harness.MODULE + ".api")
    image = api.generate_world(
        PROMPT, seed=CFG.get("render_seed", 8), steps=3, wait=True, timeout=120, **SMALL
    )
    world = bpy.context.scene.world
    data["returned_kind"] = image.get("dit360_kind")
    env, strength = harness.environment_for_prediction(world)
    image = sys.modules[harness.MODULE + ".blender.world"].current_image(world)  # .hdr: the sun in the map
    data["env_mean"] = [float(x) for x in env.reshape(-1, 3).mean(axis=0)]
    data["strength"] = strength
    renders = {}
    for label, rotation in (("rot0", 0.0), ("rot180", 3.141592653589793)):
        world.dit360.rotation = rotation
        t0 = time.monotonic()
        mean, covered = harness.render_sphere_mean(str(WORK / f"cycles_{label}.exr"))
        renders[label] = {
            "mean": mean,
            "covered_px": covered,
            "predicted": harness.predicted_sphere_mean(env, rotation, strength=strength),
            "seconds": time.monotonic() - t0,
        }
    world.dit360.rotation = 0.0
    # a black environment (same chain, image swapped): the sphere must go dark
    black = bpy.data.images.new("black", 16, 8)
    black.pixels.foreach_set([0.0, 0.0, 0.0, 1.0] * 16 * 8)
    sys.modules[harness.MODULE + ".blender.world"].set_image(world, black)
    renders["black"] = {"mean": harness.render_sphere_mean(str(WORK / "cycles_black.exr"))[0]}
    sys.modules[harness.MODULE + ".blender.world"].set_image(world, image)
    data["renders"] = renders


# -- preferences: dependencies and models ------------------------------------------------------------


def _task_done(name):
    return lambda: name not in ctrl().setup.tasks


def step_dependencies(data: dict) -> None:
    p = addon_prefs()
    s = wm_state()
    # an existing environment (the venv): torch and its device are reported
    p.python_source = "CUSTOM"
    p.python_path = WORKER_PY
    bpy.ops.dit360.check_dependencies()
    data["state_while_checking"] = s.deps_state
    _run_until(_task_done("deps_check"), timeout=180)
    data["custom"] = {"state": s.deps_state, "summary": s.deps_summary, "detail": s.deps_detail}
    # a Python without torch
    p.python_path = CFG["python_without_torch"]
    bpy.ops.dit360.check_dependencies()
    _run_until(_task_done("deps_check"), timeout=180)
    data["no_torch"] = {"state": s.deps_state, "summary": s.deps_summary, "detail": s.deps_detail}
    # Install Dependencies: Blender's Python into the add-on's user folder (a local wheel, no network)
    p.python_source = "BLENDER"
    bpy.context.preferences.system.use_online_access = False
    try:
        bpy.ops.dit360.install_dependencies(packages=CFG["fake_package"])
        data["offline_install"] = "ran"
    except RuntimeError as exc:
        data["offline_install"] = str(exc)
    bpy.context.preferences.system.use_online_access = True
    os.environ["PIP_NO_INDEX"] = "1"
    os.environ["PIP_FIND_LINKS"] = CFG["wheel_dir"]
    t0 = time.monotonic()
    result = bpy.ops.dit360.install_dependencies(packages=CFG["fake_package"])
    data["install_returned_s"] = time.monotonic() - t0
    data["install_result"] = sorted(result)
    data["state_while_installing"] = s.deps_state
    statuses = []
    TIMERS.pump(
        lambda: "install" not in ctrl().setup.tasks and "deps_check" not in ctrl().setup.tasks,
        timeout=300,
        on_tick=lambda: statuses.append(s.install_status),
    )
    data["install_statuses"] = list(dict.fromkeys(statuses))[-8:]
    vendor = Path(bpy.utils.extension_path_user(harness.MODULE, path="vendor", create=False))
    data["vendor"] = str(vendor)
    data["vendor_has_package"] = (vendor / CFG["fake_package"]).is_dir()
    data["install_log"] = s.install_log
    data["install_log_exists"] = Path(s.install_log).is_file()
    data["after_install"] = {"state": s.deps_state, "summary": s.deps_summary, "status": s.install_status}
    os.environ.pop("PIP_NO_INDEX")
    os.environ.pop("PIP_FIND_LINKS")
    p.python_source = "CUSTOM"
    p.python_path = WORKER_PY


def step_models(data: dict) -> None:
    p = addon_prefs()
    s = wm_state()
    p.models_source = "FOLDER"
    p.models_dir = CFG["models"]
    bpy.ops.dit360.check_models()
    _run_until(_task_done("models_check"))
    data["found"] = {"state": s.models_state, "summary": s.models_summary}
    empty = WORK / "empty-models2"
    empty.mkdir(exist_ok=True)
    p.models_dir = str(empty)
    bpy.ops.dit360.check_models()
    _run_until(_task_done("models_check"))
    data["missing"] = {"state": s.models_state, "summary": s.models_summary, "missing": s.models_missing}
    # offline: refused before anything runs, with the reason
    bpy.context.preferences.system.use_online_access = False
    try:
        bpy.ops.dit360.download_models()
        data["offline"] = {"result": "ran"}
    except RuntimeError as exc:
        data["offline"] = {"result": str(exc)}
    data["offline"].update(error=s.download_error, hint=s.download_hint, tasks=sorted(ctrl().setup.tasks))
    bpy.context.preferences.system.use_online_access = True
    # the Hub refuses (a stand-in Hub; this token was not granted FLUX.1-dev): the licence step is explained
    os.environ["HF_ENDPOINT"] = CFG["hub_url"]
    p.hf_token = CFG["wrong_token"]
    bpy.ops.dit360.download_models()
    _run_until(_task_done("download"), timeout=120)
    data["gated"] = {"state": s.models_state, "code": s.download_code, "error": s.download_error,
                     "hint": s.download_hint, "status": s.download_status}  # fmt: skip
    # with a granted token: every file arrives with its progress, into the chosen models folder
    p.hf_token = CFG["hf_token"]
    target = WORK / "downloaded-models"
    target.mkdir(exist_ok=True)
    p.models_dir = str(target)
    files_seen = []
    bpy.ops.dit360.download_models()
    data["state_while_downloading"] = s.models_state
    TIMERS.pump(_task_done("download"), timeout=120,
                on_tick=lambda: files_seen.extend((f.name, f.progress) for f in s.download_files))  # fmt: skip
    data["download"] = {
        "state": s.models_state,
        "summary": s.models_summary,
        "status": s.download_status,
        "error": s.download_error,
        "hint": s.download_hint,
        "files": [(f.name, f.done, f.total, f.progress) for f in s.download_files],
        "on_disk": sorted(str(q.relative_to(target)) for q in target.rglob("*") if q.is_file()
                          and ".cache" not in q.parts),
    }  # fmt: skip
    os.environ.pop("HF_ENDPOINT")
    logs = Path(s.download_log).parent
    text = "".join(q.read_text(encoding="utf-8", errors="replace") for q in logs.glob("*.log"))
    data["token_in_logs"] = CFG["hf_token"] in text or CFG["wrong_token"] in text
    data["token_in_prefs_type"] = addon_prefs().bl_rna.properties["hf_token"].subtype
    p.models_dir = CFG["models"]
    p.hf_token = ""


# A download child (standing in for worker/download.py, run as the worker's "Python") that mixes a
# refused message, plain text and an oversized line into good messages.
FAKE_DOWNLOAD_CHILD = """#!{python}
import sys
from dit360_blender.protocol import MAX_MESSAGE_BYTES, encode, message
out = sys.stdout.buffer
components = dict(transformer="t", vae=None, text_encoder="c", tokenizer="c", text_encoder_2="c",
                  tokenizer_2="c", lora="l")
out.write(encode(message("found", components=components)))
out.write(b"some library's own output\\n")
out.write(b'{{"v": 1, "type": "download_progress", "file": "bad.bin"}}\\n')
out.write(b"x" * (MAX_MESSAGE_BYTES + 100) + b"\\n")
out.write(encode(message("download_progress", file="ae.safetensors", done=50, total=100)))
out.write(encode(message("download_progress", file="ae.safetensors", done=100, total=100)))
out.write(encode(message("downloaded", components=dict(components, vae="ae.safetensors"))))
"""


def step_child_messages(data: dict) -> None:
    p = addon_prefs()
    s = wm_state()
    fake = WORK / "fake_download_child.py"
    fake.write_text(FAKE_DOWNLOAD_CHILD.format(python=sys.executable), encoding="utf-8")
    fake.chmod(0o755)
    p.python_source = "CUSTOM"
    p.python_path = str(fake)
    bpy.ops.dit360.download_models()
    _run_until(_task_done("download"), timeout=60)
    data.update(state=s.models_state, status=s.download_status, error=s.download_error,
                files=[(f.name, f.done, f.total, f.progress) for f in s.download_files],
                log=Path(s.download_log).read_text(encoding="utf-8", errors="replace")[-4000:])  # fmt: skip
    p.python_path = WORKER_PY


# -- history, panels, preview lighting ---------------------------------------------------------------


def step_history(data: dict) -> None:
    scene = bpy.context.scene
    h = scene.dit360.history
    data["len"] = len(h)
    data["entries"] = [{"seed": e.seed, "image": e.image_name, "file": e.filepath} for e in h]
    last = len(h) - 1  # the oldest
    world = scene.world
    bpy.ops.dit360.apply_history(index=last)
    mod_world = sys.modules[harness.MODULE + ".blender.world"]
    data["applied_image"] = mod_world.current_image(scene.world).name
    data["applied_file"] = str(
        Path(bpy.path.abspath(mod_world.current_image(scene.world).filepath)).resolve()
    )
    data["oldest_file"] = str(Path(h[last].filepath).resolve())
    applied = mod_world.current_image(scene.world)
    data["applied_png"] = str(Path(applied.get("dit360_png_file", "")).resolve())
    data["oldest_hdrs"] = [str(Path(q).resolve()) for q in (h[last].hdr_path, h[last].lighting_path) if q]
    scene.dit360.seed = 1
    scene.dit360.randomize_seed = True
    bpy.ops.dit360.history_to_panel(index=last)
    data["panel_after_copy"] = {"seed": scene.dit360.seed, "prompt": scene.dit360.prompt,
                                "randomize": scene.dit360.randomize_seed, "steps": scene.dit360.steps}  # fmt: skip
    data["world"] = world.name if world else None


def step_world_controls(data: dict) -> None:
    world = bpy.context.scene.world
    settings = world.dit360
    data["exposure"] = sys.modules[harness.MODULE + ".blender.output"].exposure(
        sys.modules[harness.MODULE + ".blender.world"].current_image(world)
    )
    settings.strength = 2.5
    settings.split_camera = True
    settings.camera_strength = 0.25
    d = describe(world)
    data["split_links"] = [lk for lk in d["links"] if "DiT360" in lk]
    data["strengths"] = {name: n["inputs"].get("Strength") for name, n in d["nodes"].items() if n["role"]}
    settings.split_camera = False
    d = describe(world)
    data["unsplit_links"] = [lk for lk in d["links"] if "DiT360" in lk]
    data["unsplit_nodes"] = sorted(name for name, n in d["nodes"].items() if n["role"])
    settings.strength = 1.0


class _Layout:
    """Records what a panel draws; any layout call works and returns another recorder."""

    def __init__(self, log: list) -> None:
        self._log = log

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self._log.append((name, kwargs.get("text"), args[1] if name == "operator" and len(args) > 1 else None,
                              args[0] if args and isinstance(args[0], str) else None))  # fmt: skip
            return _Layout(self._log)

        return call

    def __setattr__(self, name, value):
        if name == "_log":
            object.__setattr__(self, name, value)


def step_panels(data: dict) -> None:
    panels = sys.modules[harness.MODULE + ".blender.panels"]
    prefs_mod = sys.modules[harness.MODULE + ".blender.prefs"]
    s = wm_state()
    drawn = {}
    cases = {
        "idle": {},
        "running": {"running": True, "status": "Sampling 2/3", "eta": 3.0, "progress": 0.5},
        "error_deps": {"running": False, "error_code": "worker_start_failed", "error_message": "No torch.",
                       "error_hint": "Install dependencies"},
        "error_weights": {"error_code": "weights_missing", "error_message": "Model files missing: vae",
                          "error_hint": "Press Download Models\nor copy files"},
        "deps_missing": {"error_code": "", "error_message": "", "deps_state": "MISSING", "deps_summary": "no torch",
                         "models_state": "MISSING", "models_missing": "transformer, vae"},
    }  # fmt: skip
    for case, values in cases.items():
        for k, v in values.items():
            setattr(s, k, v)
        log: list = []
        fake = type("P", (), {"layout": _Layout(log)})()
        for cls in (panels.DIT360_PT_main, panels.DIT360_PT_advanced, panels.DIT360_PT_world,
                    panels.DIT360_PT_history, panels.DIT360_PT_world_properties):  # fmt: skip
            cls.draw(fake, bpy.context)
        fake_prefs = type("Q", (), {})()
        prefs_obj = addon_prefs()
        for name in (
            "python_source",
            "python_path",
            "models_source",
            "memory_mode",
            "show_files",
            "hf_token",
        ):
            setattr(fake_prefs, name, getattr(prefs_obj, name))
        fake_prefs.layout = _Layout(log)
        for method in ("_draw_dependencies", "_draw_models", "_draw_performance"):
            getattr(prefs_mod.DIT360_Preferences, method)(
                fake_prefs, *((_Layout(log), s) if method != "_draw_performance" else (_Layout(log),))
            )
        drawn[case] = [entry for entry in log if entry[0] in ("operator", "label", "progress")]
    data["operators"] = {
        case: sorted({e[3] for e in log if e[0] == "operator" and e[3]}) for case, log in drawn.items()
    }
    data["labels"] = {
        case: [e[1] for e in log if e[0] == "label" and e[1]][:40] for case, log in drawn.items()
    }
    s.running = False
    s.error_code = s.error_message = s.error_hint = ""
    s.deps_state = s.models_state = "UNKNOWN"
    for fn in list(TIMERS.due):  # the draws asked for background checks: not needed here
        if getattr(fn, "__name__", "") == "_run_checks":
            TIMERS.unregister(fn)


def step_preview_lighting(data: dict) -> None:
    result = bpy.ops.dit360.preview_lighting(mode="MATERIAL")
    shadings = []
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type == "VIEW_3D":
                sh = area.spaces[0].shading
                shadings.append({"type": sh.type, "scene_world": sh.use_scene_world})
    data["material"] = {"result": sorted(result), "shadings": shadings}
    bpy.ops.dit360.preview_lighting(mode="RENDERED")
    data["rendered"] = [
        {"type": a.spaces[0].shading.type, "scene_world_render": a.spaces[0].shading.use_scene_world_render}
        for w in bpy.context.window_manager.windows
        for a in w.screen.areas
        if a.type == "VIEW_3D"
    ]


def step_idle_stop(data: dict) -> None:
    addon_prefs().idle_minutes = 1
    link = ctrl().link
    link.ensure_client().start()  # a worker, idle
    data["pid"] = link.client.worker_pid
    link._last_busy = time.monotonic() - 61  # as if a minute had passed without a job
    sys.modules[harness.MODULE + ".blender.pump"].ensure_timer()
    _run_until(lambda: link.client.worker_pid is None, timeout=30)
    data["pid_after"] = link.client.worker_pid
    data["info"] = wm_state().worker_info
    addon_prefs().idle_minutes = 0


def step_unregister(data: dict) -> None:
    client = ctrl().link.client
    pid = client.worker_pid if client else None
    data["pid_before"] = pid
    # a job in flight when the add-on is disabled: the worker stops and the World comes back
    world, before = _fresh_world_scene()
    bpy.ops.dit360.generate(prompt=PROMPT, seed=6, steps=400, wait=False, **SMALL)
    _run_until(_preview_seen)
    pid = ctrl().link.client.worker_pid
    data["pid_running"] = pid
    t0 = time.monotonic()
    bpy.ops.preferences.addon_disable(module=harness.MODULE)
    data["disable_s"] = time.monotonic() - t0
    time.sleep(0.5)
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    except PermissionError:
        alive = True
    if alive:  # reaped?
        try:
            alive = os.waitpid(pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            alive = False
    data["worker_alive_after"] = alive
    data["world_restored"] = describe(bpy.data.worlds["UserWorld"]) == before
    data["scene_world"] = bpy.context.scene.world.name
    data["timers_left"] = [getattr(f, "__module__", "") for f in TIMERS.due]
    data["panel_registered"] = hasattr(bpy.types, "DIT360_PT_main")
    data["torch_loaded"] = "torch" in sys.modules


ORDER = [
    ("install", step_install),
    ("generate", step_generate),
    ("undo", step_undo),
    ("api", step_api),
    ("history", step_history),
    ("world_controls", step_world_controls),
    ("cancel", step_cancel),
    ("file_load_mid_job", step_file_load_mid_job),
    ("worker_killed", step_worker_killed),
    ("missing_weights", step_missing_weights),
    ("missing_dependencies", step_missing_dependencies),
    ("render_cycles", step_render_cycles),
    ("dependencies", step_dependencies),
    ("models", step_models),
    ("child_messages", step_child_messages),
    ("panels", step_panels),
    ("preview_lighting", step_preview_lighting),
    ("idle_stop", step_idle_stop),
    ("unregister", step_unregister),
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
    # leave no timer behind: bpy 4.5 can hang at exit with one registered
    for fn in list(TIMERS.due):
        TIMERS.unregister(fn)
    bpy.app.timers.register, bpy.app.timers.unregister, bpy.app.timers.is_registered = TIMERS._real
    steps.save()
    sys.stdout.flush()
    os._exit(0)  # skip Blender's atexit add-on teardown (already done) and its slow exit
