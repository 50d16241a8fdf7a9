"""Blender properties made from the parameter table (`params.py`): name, description, default,
limits and choices are the table's, so the panel, the operator and the preferences can't drift
from what the worker accepts."""

from __future__ import annotations

from typing import Any

from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, StringProperty

from ..params import BY_NAME, GENERATE, PARAMS, Param


def param_property(param: str, /, **overrides: Any) -> Any:
    """The bpy property for table parameter `param`; `overrides` (e.g. name, options, default) win."""
    p = BY_NAME[param]
    make, kwargs = _MAKERS[p.kind]
    return make(**{"name": p.label, "description": p.help, **kwargs(p), **overrides})


def enum_identifier(value: str) -> str:
    """Enum identifiers are the table's choice values in upper case ('auto' → 'AUTO')."""
    return value.upper()


def enum_value(identifier: str) -> str:
    return identifier.lower()


def _number(p: Param) -> dict:
    low, high = p.blender_range()
    soft_low = p.soft_min if p.soft_min is not None else low
    soft_high = p.soft_max if p.soft_max is not None else high
    kind = int if p.kind == "int" else float
    limits = {"min": low, "max": high, "soft_min": soft_low, "soft_max": soft_high}
    default = 0 if p.default is None else p.default
    return {"default": kind(default), **{k: kind(v) for k, v in limits.items() if v is not None}}


def _choice(p: Param) -> dict:
    items = [(enum_identifier(c.value), c.label, c.help) for c in p.choices]
    return {"items": items, "default": enum_identifier(p.default)}


_MAKERS = {
    "int": (IntProperty, _number),
    "float": (FloatProperty, _number),
    "str": (StringProperty, lambda p: {"default": p.default or ""}),
    "bool": (BoolProperty, lambda p: {"default": bool(p.default)}),
    "choice": (EnumProperty, _choice),
}


def scene_job_values(
    settings: Any, overrides: dict[str, Any], skip: tuple[str, ...] = (), job: str = GENERATE
) -> dict[str, Any]:
    """The parameters of a `job` kind the panel holds (`blender="scene"` in the table), with
    `overrides` (from the operator or the scripting API; None = not given) winning; enum
    identifiers → table values."""
    values = {}
    for p in PARAMS:
        if p.blender != "scene" or p.name in skip or job not in p.jobs:
            continue
        value = overrides.get(p.name)
        if value is None:
            value = getattr(settings, p.name)
        values[p.name] = enum_value(value) if p.kind == "choice" else value
    return values


def prefs_job_values(prefs: Any) -> dict[str, Any]:
    """The job parameters the add-on preferences hold (`blender="prefs"` in the table), as the
    protocol wants them: enum identifiers → the table's values, a nullable number's 0 → None;
    without preferences (the add-on not registered), the table's defaults."""
    values = {}
    for p in PARAMS:
        if p.blender != "prefs":
            continue
        if prefs is None:
            values[p.name] = p.default
            continue
        value = getattr(prefs, p.name)
        if p.kind == "choice":
            value = enum_value(value)
        elif p.nullable and value == 0:
            value = None
        values[p.name] = value
    if values["memory_mode"] != "stream":
        values["vram_budget_gib"] = None  # the panel offers the budget for Stream only
    return values
