"""Weights must not stay memory-mapped from their files while the worker serves jobs.

safetensors (and GGUF, through numpy) hand out tensors that are views of the file's pages. Where the
loader keeps such a tensor as it is (a CPU tensor in the file's dtype: the whole transformer and VAE
of a CPU run), a file cut short or rewritten in place under a loaded model turns the next read of it
into SIGBUS, which kills the process mid-job. So after a load, every CPU tensor whose memory torch
doesn't own (its storage is not resizable: exactly the mapped ones) is copied into the process.

The cost: those weights take private RAM instead of page cache the kernel could drop, and a memcpy at
load (about a second per few GB). On a GPU run the weights are on the device already and nothing, or
little, is copied. Within the load itself the files are still read through their mapping, so a file
cut short at that moment can still end the process; the worker's model cache notices a changed file
before each job (model_files/identity.py) and loads it anew, which refuses a truncated one cleanly.
"""

from __future__ import annotations

from torch import Tensor, nn


def copy_mapped_weights(root: object) -> int:
    """Copy the file-mapped CPU tensors of every module reachable from `root` (a module, or an object
    of this package holding modules, e.g. DiT360Pipeline) into private memory; views of one mapping
    stay views of one copy. Returns the bytes copied."""
    copies: dict[int, object] = {}  # mapped storage's address -> its private copy
    for module in _modules(root, set()):
        for tensor in _own_tensors(module):
            if _mapped(tensor):
                _privatise(tensor, copies)
    return sum(storage.nbytes() for storage in copies.values())


def _modules(obj: object, seen: set[int]):
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        yield from obj.modules()
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _modules(item, seen)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _modules(item, seen)
    elif type(obj).__module__.split(".")[0] == __name__.split(".")[0]:  # our holders, not tokenizers
        for item in vars(obj).values() if hasattr(obj, "__dict__") else ():
            yield from _modules(item, seen)


def _own_tensors(module: nn.Module) -> list[Tensor]:
    """Parameters, buffers and plain tensor attributes (quantised blocks, scales) of `module` itself."""
    tensors = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    return tensors + [v for v in vars(module).values() if isinstance(v, Tensor)]


def _mapped(tensor: Tensor) -> bool:
    if tensor.device.type != "cpu" or tensor.is_pinned() or tensor.numel() == 0:
        return False
    return not tensor.untyped_storage().resizable()  # memory torch didn't allocate


def _privatise(tensor: Tensor, copies: dict[int, object]) -> None:
    storage = tensor.untyped_storage()
    copy = copies.get(storage.data_ptr())
    if copy is None:
        copy = copies[storage.data_ptr()] = storage.clone()
    private = tensor.new_empty(0).set_(copy, tensor.storage_offset(), tensor.size(), tensor.stride())
    tensor.data = private  # in place: every holder of this tensor object sees the copy
