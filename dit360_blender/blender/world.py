"""The World's node setup: ours is tagged, created when absent, reused when present.

    Texture Coordinate ─▶ Mapping (Z rotation) ─▶ Environment Texture ─▶ Background ─▶ World Output
                                                                   └▶ Background (camera) ─┐
                                                     Light Path (Is Camera Ray) ─▶ Mix Shader ┘  (optional)

Every node we add carries a custom property ``dit360_role`` and sits in a Frame labelled "DiT360",
so the user can tell them apart and we can find them again whatever they are renamed to.
Regenerating swaps the Environment Texture's image (and the Background strengths follow its
exposure) and nothing else; nodes the user added stay where they are (they are disconnected from the
output only when our chain is first created). The Sun lamp that goes with the image is `lighting.py`'s.
"""

from __future__ import annotations

import bpy

from .output import exposure

ROLE = "dit360_role"
FRAME_LABEL = "DiT360"
# role -> (node type, location) ; locations keep the chain readable in the Shader Editor.
_LAYOUT: dict[str, tuple[str, tuple[float, float]]] = {
    "texcoord": ("ShaderNodeTexCoord", (-900.0, 300.0)),
    "mapping": ("ShaderNodeMapping", (-700.0, 300.0)),
    "env": ("ShaderNodeTexEnvironment", (-500.0, 300.0)),
    "background": ("ShaderNodeBackground", (-200.0, 320.0)),
    "camera_background": ("ShaderNodeBackground", (-200.0, 180.0)),
    "lightpath": ("ShaderNodeLightPath", (-200.0, 620.0)),
    "mix": ("ShaderNodeMixShader", (20.0, 320.0)),
}
CHAIN = ("texcoord", "mapping", "env", "background")
SPLIT = ("camera_background", "lightpath", "mix")
_LABELS = {
    "texcoord": "DiT360 Coordinates",
    "mapping": "DiT360 Rotation",
    "env": "DiT360 Environment",
    "background": "DiT360 Lighting",
    "camera_background": "DiT360 Camera",
    "lightpath": "DiT360 Light Path",
    "mix": "DiT360 Camera/Lighting",
}


def node_tree(world: bpy.types.World) -> bpy.types.NodeTree:
    """The World's node tree. Blender 4.x: new worlds have none until `use_nodes` is on; 5.0 always
    has one and deprecates `use_nodes`."""
    if bpy.app.version < (5, 0, 0) and not world.use_nodes:
        world.use_nodes = True
    return world.node_tree


def our_nodes(world: bpy.types.World) -> dict[str, bpy.types.Node]:
    """Role -> node for the nodes we made (the frame included, as "frame")."""
    if world is None or world.node_tree is None:
        return {}
    return {n[ROLE]: n for n in world.node_tree.nodes if isinstance(n.get(ROLE), str)}


def output_node(nt: bpy.types.NodeTree) -> bpy.types.Node | None:
    """The World Output Blender uses: the active one, else any."""
    outputs = [n for n in nt.nodes if n.bl_idname == "ShaderNodeOutputWorld"]
    for n in outputs:
        if n.is_active_output:
            return n
    return outputs[0] if outputs else None


def has_chain(world: bpy.types.World | None) -> bool:
    nodes = our_nodes(world) if world is not None else {}
    return all(role in nodes for role in CHAIN)


def ensure_chain(world: bpy.types.World) -> dict[str, bpy.types.Node]:
    """Make sure our chain exists and is wired; returns role -> node. Nodes that exist are reused."""
    nt = node_tree(world)
    nodes = our_nodes(world)
    created = False
    frame = nodes.get("frame")
    if frame is None:
        frame = nt.nodes.new("NodeFrame")
        frame[ROLE] = "frame"
        frame.name = frame.label = FRAME_LABEL
        frame.label_size = 20
        nodes["frame"] = frame
    for role in CHAIN:
        if role not in nodes:
            nodes[role] = _new(nt, role, frame)
            created = True
    nodes["env"].projection = "EQUIRECTANGULAR"
    links = nt.links
    _link(links, nodes["texcoord"].outputs["Generated"], nodes["mapping"].inputs["Vector"])
    _link(links, nodes["mapping"].outputs["Vector"], nodes["env"].inputs["Vector"])
    _link(links, nodes["env"].outputs["Color"], nodes["background"].inputs["Color"])
    out = output_node(nt)
    if out is None:
        out = nt.nodes.new("ShaderNodeOutputWorld")
        out[ROLE] = "output"
        out.location = (240.0, 320.0)
        created = True
    surface = out.inputs["Surface"]
    # Connect to the output when our chain is new or nothing feeds it; a user who rewired the output
    # to their own nodes afterwards keeps that wiring on every regeneration.
    if created or not surface.is_linked:
        links.new(_final_shader(world, nodes).outputs[0], surface)
    sync_controls(world)
    return nodes


def _new(nt: bpy.types.NodeTree, role: str, frame: bpy.types.Node) -> bpy.types.Node:
    kind, location = _LAYOUT[role]
    node = nt.nodes.new(kind)
    node[ROLE] = role
    node.label = _LABELS[role]
    node.name = _LABELS[role]
    node.location = location
    node.parent = frame
    return node


def _link(
    links: bpy.types.NodeLinks, out_socket: bpy.types.NodeSocket, in_socket: bpy.types.NodeSocket
) -> None:
    for link in in_socket.links:
        if link.from_socket == out_socket:
            return
    links.new(out_socket, in_socket)


def _final_shader(world: bpy.types.World, nodes: dict[str, bpy.types.Node]) -> bpy.types.Node:
    return nodes["mix"] if world.dit360.split_camera and "mix" in nodes else nodes["background"]


def set_image(world: bpy.types.World, image: bpy.types.Image) -> dict[str, bpy.types.Node]:
    """Show `image` as the environment: the chain is created if needed, only the image changes."""
    nodes = ensure_chain(world)
    if nodes["env"].image != image:
        nodes["env"].image = image
        sync_controls(world)  # the exposure belongs to the image
    return nodes


def background_strength(world: bpy.types.World | None) -> float:
    """The strength the lighting Background node has (or gets): exposure x the Strength control."""
    if world is None:
        return 1.0
    return exposure(current_image(world)) * world.dit360.strength


def current_image(world: bpy.types.World | None) -> bpy.types.Image | None:
    env = our_nodes(world).get("env") if world is not None else None
    return env.image if env is not None else None


def sync_controls(world: bpy.types.World) -> None:
    """Write the World's DiT360 settings (rotation, strengths, split) into our nodes.

    The strengths are multipliers on the environment's computed exposure (`output.exposure`: the
    Background strength at which a grey card of albedo 0.18 facing up renders 0.18; 1.0 for images
    that carry no lighting analysis)."""
    nodes = our_nodes(world)
    if not all(role in nodes for role in CHAIN):
        return  # nothing of ours yet: the settings apply when the chain is made
    settings = world.dit360
    nt = world.node_tree
    rotation = nodes["mapping"].inputs["Rotation"].default_value
    if abs(rotation[2] - settings.rotation) > 1e-7:
        rotation[2] = settings.rotation
    auto = exposure(nodes["env"].image)
    _set(nodes["background"].inputs["Strength"], auto * settings.strength)
    out = output_node(nt)
    if settings.split_camera:
        frame = nodes.get("frame")
        for role in SPLIT:
            if role not in nodes:
                nodes[role] = _new(nt, role, frame)
        _link(nt.links, nodes["env"].outputs["Color"], nodes["camera_background"].inputs["Color"])
        _link(nt.links, nodes["lightpath"].outputs["Is Camera Ray"], nodes["mix"].inputs["Fac"])
        _link(nt.links, nodes["background"].outputs["Background"], nodes["mix"].inputs[1])
        _link(nt.links, nodes["camera_background"].outputs["Background"], nodes["mix"].inputs[2])
        _set(nodes["camera_background"].inputs["Strength"], auto * settings.camera_strength)
        if out is not None and _feeds_output(out, nodes["background"]):
            nt.links.new(nodes["mix"].outputs["Shader"], out.inputs["Surface"])
    elif any(role in nodes for role in SPLIT):
        was_final = out is not None and "mix" in nodes and _feeds_output(out, nodes["mix"])
        for role in SPLIT:
            if role in nodes:
                nt.nodes.remove(nodes.pop(role))
        if was_final:
            nt.links.new(nodes["background"].outputs["Background"], out.inputs["Surface"])


def _set(socket: bpy.types.NodeSocket, value: float) -> None:
    if abs(socket.default_value - value) > 1e-7:  # no needless depsgraph updates
        socket.default_value = value


def _feeds_output(out: bpy.types.Node, node: bpy.types.Node) -> bool:
    return any(link.from_node == node for link in out.inputs["Surface"].links)


def describe(world: bpy.types.World | None) -> dict:
    """A plain description of a World's nodes, links and values: tests and the restore check use it
    to prove that a failed job left the World exactly as it was."""
    if world is None:
        return {"world": None}
    nt = world.node_tree
    desc: dict = {"world": world.name, "props": {k: str(world[k]) for k in world.keys() if k != "dit360"}}
    if nt is None:
        desc["nodes"] = None
        return desc
    nodes = {}
    for n in nt.nodes:
        values = {}
        for s in n.inputs:
            if hasattr(s, "default_value"):
                v = s.default_value
                values[s.identifier] = [round(x, 6) for x in v] if hasattr(v, "__len__") else round(v, 6)
        image = getattr(n, "image", None)
        nodes[n.name] = {
            "type": n.bl_idname,
            "role": n.get(ROLE),
            "image": image.name if image is not None else None,
            "inputs": values,
        }
    desc["nodes"] = nodes
    desc["links"] = sorted(
        f"{lk.from_node.name}:{lk.from_socket.identifier}->{lk.to_node.name}:{lk.to_socket.identifier}"
        for lk in nt.links
    )
    return desc
