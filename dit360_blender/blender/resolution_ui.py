"""The panel's Resolution and Refine settings with what they will cost (estimates.py), and the sizes
of a history entry. Drawn by blender/panels.py; the properties are the parameter table's."""

from __future__ import annotations

import bpy

from ..estimates import ASSUMPTIONS, estimate
from ..params import BY_NAME
from . import resolution
from .param_props import enum_value


def last_generation_seconds(settings: bpy.types.PropertyGroup) -> float | None:
    """How long the newest 2K (native) generation of this scene took: the estimates' time scale."""
    for entry in settings.history:
        if entry.seconds > 0 and enum_value(entry.size) == "native" and not entry.parent:
            return float(entry.seconds)
    return None


def estimate_for(settings: bpy.types.PropertyGroup):
    return estimate(
        enum_value(settings.size),
        settings.refine,
        settings.refine_strength,
        base_width=settings.width,
        generation_s=last_generation_seconds(settings),
    )


def draw_resolution(layout: bpy.types.UILayout, settings: bpy.types.PropertyGroup) -> None:
    """Resolution (2K native / 4K / 8K / 16K), Refine and its strength, and the estimate line."""
    col = layout.column(align=True)
    col.label(text=BY_NAME["size"].label)
    col.row(align=True).prop(settings, "size", expand=True)
    if enum_value(settings.size) == "native":
        return
    row = col.row(align=True)
    row.prop(settings, "refine", toggle=True)
    sub = row.row(align=True)
    sub.enabled = settings.refine
    sub.prop(settings, "refine_strength", text="Strength")
    try:
        cost = estimate_for(settings)
    except ValueError as exc:
        col.label(text=str(exc), icon="ERROR")
        return
    box = layout.box().column(align=True)
    box.label(text=cost.text(), icon="INFO")
    if cost.vram_note:
        box.label(text=cost.vram_note)
    box.label(text=ASSUMPTIONS.split(";")[0] + ".")


def draw_entry_sizes(layout: bpy.types.UILayout, entry: bpy.types.PropertyGroup, index: int) -> None:
    """'Sizes: 4K · 2K (the World shows 4K)' for an entry with more than one size, and the button
    that upscales it to the panel's Resolution."""
    labels = resolution.size_labels(entry)
    if len(labels) > 1:
        layout.label(text=f"Sizes: {' · '.join(labels)} (the World shows {labels[0]})")
    size = enum_value(entry.id_data.dit360.size) if hasattr(entry.id_data, "dit360") else "native"
    if size != "native":
        label = BY_NAME["size"].choices[BY_NAME["size"].choice_values.index(size)].label
        layout.operator(
            "dit360.upscale_history", text=f"Upscale to {label}", icon="FULLSCREEN_ENTER"
        ).index = index
