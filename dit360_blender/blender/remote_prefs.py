"""The preferences of a remote worker (issue 16): Worker: Local / Remote, and for Remote either an SSH
host alias (the add-on runs the tunnel with the user's own ssh and keys) or the host:port of a tunnel
the user runs, plus the token file copied from the GPU machine. No password is ever asked or kept.

The properties are declared here and listed in prefs.py's AddonPreferences; `draw` fills their box;
`remote_spec` turns them into the client's RemoteSpec (None: the local worker).
"""

from __future__ import annotations

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty

from ..protocol import SERVE_PORT
from ..remote_client import RemoteSpec

WORKER_MODE = EnumProperty(
    name="Worker",
    items=[
        ("LOCAL", "Local", "Start the worker on this computer (its GPU or CPU)"),
        (
            "REMOTE",
            "Remote",
            "Use a worker serving on a GPU machine (python -m dit360_blender.worker --serve), over SSH",
        ),
    ],
    default="LOCAL",
)
REMOTE_CONNECTION = EnumProperty(
    name="Connect",
    items=[
        (
            "SSH",
            "SSH Host",
            "The add-on runs ssh -N -L itself (BatchMode: your keys or agent, never a password)",
        ),
        ("ADDRESS", "Host:Port", "A tunnel you run yourself, e.g. ssh -N -L 7860:127.0.0.1:7860 gpu-box"),
    ],
    default="SSH",
)
REMOTE_SSH_ALIAS = StringProperty(
    name="SSH Host", description="A Host of your ~/.ssh/config (or user@host) that logs in without a password"
)
REMOTE_PORT = IntProperty(
    name="Worker Port",
    description="The port the worker serves on, on its machine",
    default=SERVE_PORT,
    min=1,
    max=65535,
)
REMOTE_ADDRESS = StringProperty(
    name="Address",
    description="The local end of your tunnel (loopback only)",
    default=f"127.0.0.1:{SERVE_PORT}",
)
REMOTE_TOKEN_FILE = StringProperty(
    name="Token File",
    description="A copy of the token file the worker printed (readable by you only: chmod 600)",
    subtype="FILE_PATH",
)


def remote_spec(prefs: bpy.types.AddonPreferences | None) -> RemoteSpec | None:
    """The remote worker the preferences name, or None for the local worker."""
    if prefs is None or prefs.worker_mode != "REMOTE":
        return None
    token_file = bpy.path.abspath(prefs.remote_token_file.strip())
    if prefs.remote_connection == "SSH":
        return RemoteSpec(
            token_file=token_file, ssh_alias=prefs.remote_ssh_alias.strip(), remote_port=prefs.remote_port
        )
    return RemoteSpec(token_file=token_file, address=prefs.remote_address.strip())


def ready_text(event: dict, remote: bool) -> str:
    """The status line of a `ready` worker: where it runs, its GPU and its free memory (or that it
    is still loading torch: the `device` event brings those seconds after `ready`)."""
    where = "Remote worker" if remote else "Worker"
    if not event.get("device"):
        return f"{where} ready, loading torch..."
    free = event.get("free_vram")
    vram = f", {free / 2**30:.1f} GiB free" if isinstance(free, int) else ""
    return f"{where} ready: {event.get('device_name')} ({event.get('device')}{vram}), torch {event.get('torch_version')}"


def draw(prefs: bpy.types.AddonPreferences, box: bpy.types.UILayout) -> None:
    box.label(text="Worker", icon="NETWORK_DRIVE")
    box.prop(prefs, "worker_mode", expand=True)
    if prefs.worker_mode != "REMOTE":
        return
    box.prop(prefs, "remote_connection", expand=True)
    if prefs.remote_connection == "SSH":
        box.prop(prefs, "remote_ssh_alias")
        box.prop(prefs, "remote_port")
    else:
        box.prop(prefs, "remote_address")
    box.prop(prefs, "remote_token_file")
    col = box.column(align=True)
    col.label(text="On the GPU machine: python -m dit360_blender.worker --serve", icon="INFO")
    col.label(text="then copy the token file it prints here (scp), chmod 600.")
