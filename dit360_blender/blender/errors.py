"""The error every Blender-side failure of a generation or a set-up step is shown as. No bpy."""

from __future__ import annotations


class GenerationError(Exception):
    """A generation that could not start or did not finish: the protocol error code, what happened
    and the fix. `api.generate_world` raises it; the panel shows `message` and `hint`."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(f"{message}\n  fix: {hint}" if hint else message)
        self.code, self.message, self.hint = code, message, hint
