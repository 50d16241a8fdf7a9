"""Every place a generation parameter appears agrees with the table in `dit360_blender/params.py`:
the CLI's options, the protocol's validation, the client's Job, the scripting API and the Blender
properties (panel, operator, history, preferences — read from real bpy). A name, default, limit or
choice written out by hand somewhere and drifting from the table fails here."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dit360_blender import params
from dit360_blender.cli import build_parser
from dit360_blender.client import Job
from dit360_blender.protocol import ProtocolError, check_generate_params

ROOT = Path(__file__).resolve().parents[1]
TABLE = {p.name: p for p in params.for_job(params.GENERATE)}
BASE = {"prompt": "This is a panorama image. A beach", "output_dir": str(ROOT)}


def _generate_actions() -> dict[str, argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["generate"]._actions}


@pytest.mark.parametrize("name", [p.name for p in TABLE.values() if p.cli is not None])
def test_cli_option_matches_the_table(name):
    p, action = TABLE[name], _generate_actions()[name]
    if p.cli == "":
        assert action.option_strings == []
        return
    assert action.option_strings == [p.cli]
    if p.kind == "bool":  # the flag turns the default over
        assert isinstance(action, argparse._StoreFalseAction if p.default else argparse._StoreTrueAction)
        return
    if p.kind == "loras":  # repeatable; cli.lora_items turns the strings into the table's value
        assert isinstance(action, argparse._AppendAction) and action.default is None
        assert p.help in action.help and f"{p.minimum:g} to {p.maximum:g}" in action.help
        return
    expected_default = None if name == "seed" else p.default  # no --seed: a random seed
    assert action.default == expected_default
    assert action.type is {"int": int, "float": float}.get(p.kind, str)
    if p.kind == "choice" and p.pattern is None:
        assert tuple(action.choices) == p.choice_values
    assert p.help in action.help


def test_cli_lists_no_parameter_the_table_lacks():
    skipped = {"help", "out", "no_lora", "models_dir", "download", "quiet"}
    dests = {d for d in _generate_actions() if not d.startswith("path_")} - skipped
    assert dests == {p.name for p in TABLE.values() if p.cli is not None}


def test_cli_lora_extra_gives_the_table_value_and_its_limits():
    from dit360_blender.cli import lora_items

    args = build_parser().parse_args(
        ["generate", "x", "--lora-extra", "/l/a.safetensors:0.5", "--lora-extra", "C:\\l\\b.safetensors"]
    )
    values = params.check_values({"loras": lora_items(args.loras)})
    assert values["loras"] == (
        {"path": "/l/a.safetensors", "strength": 0.5},
        {"path": "C:\\l\\b.safetensors", "strength": 1.0},
    )
    p = TABLE["loras"]
    assert check_generate_params({**BASE, "loras": [{"path": "/a", "strength": p.maximum}]})["loras"]
    for bad in (
        [{"path": "/a", "strength": p.maximum + 1e-6}],
        [{"path": "/a", "strength": p.minimum - 1e-6}],
        [{"path": "", "strength": 1.0}],
        [{"path": "/a", "strength": "strong"}],
        [{"file": "/a"}],
        "/a.safetensors",
        [{"path": f"/{i}"} for i in range(params.MAX_LORAS + 1)],
    ):
        with pytest.raises(ProtocolError):
            check_generate_params({**BASE, "loras": bad})


def test_protocol_defaults_are_the_table_defaults():
    filled = check_generate_params(BASE)
    for p in TABLE.values():
        if p.name not in BASE:
            expected = params.MODELS_DEFAULTS if p.name == "models" else p.default
            assert filled[p.name] == expected, p.name


@pytest.mark.parametrize("name", [p.name for p in TABLE.values() if p.kind in ("int", "float")])
def test_protocol_accepts_the_limits_and_refuses_beyond(name):
    p = TABLE[name]
    step = 1 if p.kind == "int" else 1e-6
    for value, ok in (
        (p.minimum, True),
        (p.maximum, True),
        (p.minimum - step, False),
        (p.maximum + step, False),
    ):
        if p.multiple_of:
            value = value if ok else value + (-p.multiple_of + 1 if value < p.minimum else p.multiple_of - 1)
        over = {name: value}
        if name in ("width", "height"):  # keep 2:1 so only the limit is tested
            over = (
                {"width": value, "height": value // 2}
                if name == "width"
                else {"height": value, "width": 2 * value}
            )
        if ok:
            check_generate_params({**BASE, **over})
        else:
            with pytest.raises(ProtocolError) as info:
                check_generate_params({**BASE, **over})
            assert info.value.code == "bad_parameters" and info.value.hint


@pytest.mark.parametrize("name", [p.name for p in TABLE.values() if p.kind == "choice"])
def test_protocol_accepts_every_choice_and_refuses_others(name):
    for value in TABLE[name].choice_values:
        assert check_generate_params({**BASE, name: value})[name] == value
    with pytest.raises(ProtocolError):
        check_generate_params({**BASE, name: "no-such-choice"})


def test_client_job_takes_the_table_defaults():
    job = Job(**BASE)
    for p in TABLE.values():
        if p.name != "models" and p.name not in BASE:
            assert getattr(job, p.name) == p.default, p.name
    with pytest.raises(TypeError):
        Job(**BASE, not_a_parameter=1)


def test_scripting_api_names_are_table_names():
    source = (ROOT / "dit360_blender" / "blender" / "api.py").read_text(encoding="utf-8")
    tree = ast.parse(source)  # read from source: importing the API needs bpy
    fn = next(n for n in tree.body if getattr(n, "name", "") == "generate_world")
    names = [a.arg for a in fn.args.args + fn.args.kwonlyargs]
    own = {"scene", "wait", "timeout"}
    assert set(names) - own <= {p.name for p in TABLE.values() if p.blender == "scene"}


# -- Blender (real bpy, one process) -----------------------------------------------------------------

_DUMP = r"""
import json, os, sys, traceback
import bpy
sys.path.insert(0, sys.argv[1])
import dit360_blender
try:
    dit360_blender.register()
except Exception:
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)  # bpy can hang at exit after a failed registration

def dump(rna):
    out = {}
    for prop in rna.properties:
        if prop.identifier == "rna_type":
            continue
        d = {"type": prop.type, "name": prop.name, "description": prop.description}
        if prop.type in ("INT", "FLOAT"):
            d.update(default=prop.default, min=prop.hard_min, max=prop.hard_max,
                     soft_min=prop.soft_min, soft_max=prop.soft_max)
        elif prop.type == "ENUM":
            d.update(default=prop.default, items=[i.identifier for i in prop.enum_items])
        elif prop.type in ("STRING", "BOOLEAN"):
            d.update(default=prop.default)
        out[prop.identifier] = d
    return out

from dit360_blender.blender import props, prefs
result = {
    "scene": dump(props.DIT360_SceneSettings.bl_rna),
    "history": dump(props.DIT360_HistoryEntry.bl_rna),
    "operator": dump(bpy.ops.dit360.generate.get_rna_type()),
    "prefs": dump(prefs.DIT360_Preferences.bl_rna),
    "lora_item": dump(props.DIT360_LoraItem.bl_rna),
}
# the panel's LoRA list as the job gets it: add three rows, fill two, remove the middle one,
# leave a last one empty
settings = bpy.context.scene.dit360
for _ in range(4):
    bpy.ops.dit360.add_lora()
settings.loras[0].path, settings.loras[0].strength = "/loras/style.safetensors", 0.7
settings.loras[1].path = "/loras/removed.safetensors"
settings.loras[2].path = "/loras/subject.safetensors"
bpy.ops.dit360.remove_lora(index=1)
from dit360_blender.blender.generation import scene_loras
result["scene_loras"] = scene_loras(settings)
print("RESULT " + json.dumps(result), flush=True)
os._exit(0)
"""


@pytest.fixture(scope="module")
def blender_props(tmp_path_factory) -> dict:
    pytest.importorskip("bpy")
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(tmp_path_factory.mktemp("bpy-user")))
    proc = subprocess.run(
        [sys.executable, "-c", _DUMP, str(ROOT)], capture_output=True, text=True, env=env, timeout=120
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[len("RESULT ") :])


def _expected_number(p: params.Param, prop: dict) -> None:
    low, high = p.blender_range()
    assert prop["min"] == pytest.approx(low, rel=1e-6), p.name
    assert prop["max"] == pytest.approx(high, rel=1e-6), p.name
    assert prop["soft_min"] == pytest.approx(p.soft_min if p.soft_min is not None else low, rel=1e-6)
    assert prop["soft_max"] == pytest.approx(p.soft_max if p.soft_max is not None else high, rel=1e-6)
    assert prop["default"] == pytest.approx(0 if p.default is None else p.default, rel=1e-6), p.name


@pytest.mark.parametrize("group", ["scene", "history", "operator", "prefs"])
def test_blender_properties_match_the_table(blender_props, group):
    props = blender_props[group]
    where = "prefs" if group == "prefs" else "scene"
    checked = 0
    for p in TABLE.values():
        if p.blender != where:
            continue
        if group == "history" and p.name == "output_dir":
            continue  # an entry records its file, not the folder setting
        prop = props[p.name]
        checked += 1
        kinds = {"int": "INT", "float": "FLOAT", "str": "STRING", "choice": "ENUM", "bool": "BOOLEAN"}
        assert prop["type"] == kinds[p.kind]
        if p.kind in ("int", "float"):
            _expected_number(p, prop)
        elif p.kind == "bool":
            assert prop["default"] is p.default, p.name
        elif p.kind == "choice":
            assert prop["items"] == [c.upper() for c in p.choice_values], p.name
            assert prop["default"] == p.default.upper(), p.name
        if p.name not in ("output_dir",):  # the panel explains its empty default in its own words
            assert prop["description"].rstrip(".") == p.help.rstrip("."), p.name
    assert checked >= 5


def test_blender_panel_has_every_scene_parameter(blender_props):
    scene_params = {p.name for p in TABLE.values() if p.blender == "scene"}
    assert scene_params <= set(blender_props["scene"])
    assert scene_params <= set(blender_props["operator"])
    prefs_params = {p.name for p in TABLE.values() if p.blender == "prefs"}
    assert prefs_params <= set(blender_props["prefs"])


def test_blender_lora_list_matches_the_table_and_reaches_the_job(blender_props):
    p = TABLE["loras"]
    assert blender_props["scene"]["loras"]["type"] == "COLLECTION"
    item = blender_props["lora_item"]
    assert item["path"]["type"] == "STRING" and item["strength"]["type"] == "FLOAT"
    assert (item["strength"]["min"], item["strength"]["max"]) == (p.minimum, p.maximum)
    assert item["strength"]["default"] == 1.0
    loras = blender_props["scene_loras"]
    assert loras == [
        {"path": "/loras/style.safetensors", "strength": pytest.approx(0.7)},
        {"path": "/loras/subject.safetensors", "strength": 1.0},
    ]
    assert check_generate_params({**BASE, "loras": loras})["loras"]  # what the protocol accepts


# -- job kinds (issue 14): every kind's parameters through the protocol and the client --------------

EDIT_BASE = {**BASE, "source": "/pano/source.png", "mask": "/pano/mask.png"}
# the least parameters of a valid job of each kind: a new kind adds its own here
KIND_BASE = {
    params.GENERATE: BASE,
    params.EDIT: EDIT_BASE,
    params.UPSCALE: {"output_dir": str(ROOT), "source": "/pano/source.png", "size": "4k"},
    params.WARM: BASE,  # a warm job takes a generate's parameters (params.PARAMETERS_OF)
}


def test_every_kind_is_a_message_and_every_param_names_known_kinds():
    from dit360_blender.protocol import CLIENT_MESSAGES

    for kind in params.JOB_KINDS:
        assert CLIENT_MESSAGES[kind] == CLIENT_MESSAGES["generate"], kind
    for p in params.PARAMS:
        assert p.jobs and p.jobs <= set(params.JOB_KINDS), p.name
    assert set(KIND_BASE) == set(params.JOB_KINDS)
    from dit360_blender.worker.jobs import JOB_KINDS_RUN  # the worker runs every kind it queues

    assert set(JOB_KINDS_RUN) == set(params.JOB_KINDS)
    # the model and device settings are shared: a kind that samples takes all of them
    shared = {
        "seed",
        "steps",
        "guidance",
        "lora_strength",
        "loras",
        "memory_mode",
        "device",
        "dtype",
        "models",
    }
    assert shared <= {p.name for p in params.for_job(params.EDIT)}
    only_edit = {"source", "mask", "mask_kind", "strength", "feather"}
    assert only_edit <= {p.name for p in params.for_job(params.EDIT)}
    assert not only_edit & {p.name for p in params.for_job(params.GENERATE)}
    assert params.for_job(params.WARM) == params.for_job(params.GENERATE)


@pytest.mark.parametrize("kind", params.JOB_KINDS)
def test_protocol_fills_each_kinds_table_defaults_and_refuses_other_kinds_names(kind):
    from dit360_blender.protocol import check_job_params

    filled = check_job_params(kind, KIND_BASE[kind])
    assert set(filled) == {p.name for p in params.for_job(kind)}
    for p in params.for_job(kind):
        if p.name not in KIND_BASE[kind]:
            expected = params.MODELS_DEFAULTS if p.name == "models" else p.default
            assert filled[p.name] == expected, p.name
    foreign = [p.name for p in params.PARAMS if p not in params.for_job(kind)] + ["not_a_parameter"]
    for name in foreign:
        with pytest.raises(ProtocolError) as info:
            check_job_params(kind, {**KIND_BASE[kind], name: None})
        assert info.value.code == "bad_parameters" and name in info.value.message


# width/height keep their 2:1 rule; their limits are the generate test's (the same declaration)
EDIT_NUMBERS = [p.name for p in params.for_job(params.EDIT) if p.kind in ("int", "float")]


@pytest.mark.parametrize("name", [n for n in EDIT_NUMBERS if n not in ("width", "height")])
def test_edit_protocol_accepts_the_limits_and_refuses_beyond(name):
    from dit360_blender.protocol import check_job_params

    p = params.BY_NAME[name]
    step = 1 if p.kind == "int" else 1e-6
    for value, ok in (
        (p.minimum, True),
        (p.maximum, True),
        (p.minimum - step, False),
        (p.maximum + step, False),
    ):
        if ok:
            check_job_params(params.EDIT, {**EDIT_BASE, name: value})
        else:
            with pytest.raises(ProtocolError) as info:
                check_job_params(params.EDIT, {**EDIT_BASE, name: value})
            assert info.value.code == "bad_parameters" and info.value.hint


def test_edit_rules_per_mask_kind():
    from dit360_blender.protocol import check_job_params

    ok = {
        "mask": EDIT_BASE,
        "view": {**BASE, "source": "/s.png", "mask_kind": "view", "hfov": 60.0},
        "seam": {**BASE, "source": "/s.png", "mask_kind": "seam"},
        "photo": {**BASE, "mask_kind": "photo", "photo": "/p.jpg"},
    }
    assert set(ok) == set(params.MASK_KINDS) == set(params.BY_NAME["mask_kind"].choice_values)
    for kind, values in ok.items():
        assert check_job_params(params.EDIT, values)["mask_kind"] == kind
    bad = (
        ({**BASE, "mask": "/m.png"}, "source"),  # no source
        ({**BASE, "source": "/s.png"}, "mask"),  # mask kind without its mask
        ({**BASE, "source": "/s.png", "mask_kind": "view"}, "hfov"),
        ({**BASE, "mask_kind": "photo"}, "photo"),
        ({**BASE, "mask_kind": "photo", "photo": "/p.jpg", "strength": 0.5}, "strength 1"),
        ({**EDIT_BASE, "source": "relative/source.png"}, "absolute"),
        ({**EDIT_BASE, "hfov": 180.0}, "hfov"),
        ({**EDIT_BASE, "hfov": 0.0}, "hfov"),
    )
    for values, words in bad:
        with pytest.raises(ProtocolError) as info:
            check_job_params(params.EDIT, values)
        assert info.value.code == "bad_parameters" and info.value.hint
        assert words in info.value.message, info.value.message


def test_client_job_of_each_kind(tmp_path, monkeypatch):
    for kind in params.JOB_KINDS:
        job = Job(kind=kind, **KIND_BASE[kind])
        assert job.kind == kind
        for p in params.for_job(kind):
            if p.name != "models" and p.name not in KIND_BASE[kind]:
                assert getattr(job, p.name) == p.default, p.name
    with pytest.raises(TypeError, match="strength"):
        Job(**BASE, strength=0.5)  # an edit parameter in a generate job
    with pytest.raises(TypeError, match="kind"):
        Job(kind="no-such-kind", **BASE)
    monkeypatch.chdir(tmp_path)
    job = Job(kind=params.EDIT, **{**BASE, "source": "src.png", "mask": "sub/mask.png"})
    assert job.source == str(tmp_path / "src.png") and job.mask == str(tmp_path / "sub" / "mask.png")


def test_the_model_settings_are_parameters_every_sampling_kind_takes():
    generate = {p.name for p in params.for_job(params.GENERATE)}
    edit = {p.name for p in params.for_job(params.EDIT)}
    assert set(params.MODEL_SETTINGS) <= generate & edit
    assert not {"prompt", "seed", "output_dir", "width", "height"} & set(params.MODEL_SETTINGS)
