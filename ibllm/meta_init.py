"""Build a model on the meta device, shard it, then give each rank only its own slice of every tensor.

:class:`InitRecord` watches a model being constructed under ``torch.device("meta")``: every tensor factory
and every in-place initialisation (``nn.init.*``, ``uniform_``, ``zero_`` ...) that targets a meta tensor is
recorded in order, instead of the values it would have produced. :meth:`InitRecord.replay` later runs the
same calls, in the same order, on CPU scratch tensors one parameter at a time, starting from the CPU random
state the construction started from. Since the CPU generator is consumed exactly as in an ordinary CPU
construction, every parameter gets the value it would have had there, while at most one full parameter
exists at a time. :func:`assign_full` copies a full-size value into a (possibly sharded) parameter: a DTensor
keeps only the rows of its own shard.

Only whole-tensor initialisation is replayable: an in-place call on a view of a parameter, or one that reads
another meta tensor, raises ``NotImplementedError`` at construction time rather than giving wrong values.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

# Factories whose meta results may become parameters or buffers.
_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint,
              torch.arange, torch.eye, torch.tensor, torch.linspace, torch.normal}
# In-place methods that change metadata or autograd state only.
_NOT_WRITES = {"requires_grad_", "retain_grad", "detach_", "share_memory_", "__set__", "__get__"}
# Calls that draw no random numbers: skipped on replay unless their result is a wanted value.
_PURE = {"empty", "zeros", "ones", "full", "arange", "eye", "tensor", "linspace", "zero_", "fill_", "zeros_",
         "ones_", "constant_", "eye_", "dirac_"}


@dataclass
class _Event:
    func: Callable[..., Any]
    args: tuple
    kwargs: dict
    key: int  # storage of the tensor written (factory: created)
    shape: tuple[int, ...]
    dtype: torch.dtype
    factory: bool

    @property
    def pure(self) -> bool:
        return getattr(self.func, "__name__", "") in _PURE


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


def _covers_storage(t: Tensor) -> bool:
    return t.storage_offset() == 0 and t.is_contiguous() and \
        t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _tensors_in(values: Iterable[Any]) -> list[Tensor]:
    return [v for v in values if isinstance(v, Tensor)]


class InitRecord(TorchFunctionMode):
    """Records the initialisation of meta tensors (use inside ``torch.device("meta")``; see module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[_Event] = []
        self._alive: list[Tensor] = []  # keeps recorded storages alive, so their keys stay unique
        self.rng_state: Tensor | None = None

    def __enter__(self) -> "InitRecord":
        self.rng_state = torch.get_rng_state()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        if exc[0] is None and not torch.equal(torch.get_rng_state(), self.rng_state):
            raise RuntimeError("the CPU random generator was used during meta-device construction outside the "
                               "recorded calls; the construction cannot be replayed deterministically")

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if func in _FACTORIES:
            if isinstance(out, Tensor) and out.is_meta:
                self._add(func, args, kwargs, out, factory=True)
        elif name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES:
            target = kwargs["tensor"] if "tensor" in kwargs else (args[0] if args else None)
            if isinstance(target, Tensor) and target.is_meta:
                others = [t for t in _tensors_in((*args, *kwargs.values())) if t is not target]
                if others or not _covers_storage(target):
                    raise NotImplementedError(f"meta-device construction: {name} on a view of a tensor or reading "
                                              "another tensor cannot be replayed; initialise whole tensors")
                self._add(func, args, kwargs, target, factory=False)
        return out

    def _add(self, func: Callable[..., Any], args: tuple, kwargs: dict, target: Tensor, factory: bool) -> None:
        self._alive.append(target)
        self.events.append(_Event(func, args, dict(kwargs), _storage_key(target), tuple(target.shape),
                                  target.dtype, factory))

    def sources(self, module: nn.Module) -> dict[str, int]:
        """Parameter / buffer name (tied aliases included) -> the recorded storage holding its value."""
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        return {name: _storage_key(t) for name, t in named if t.is_meta}

    def replay(self, sources: Mapping[str, int], wanted: Iterable[str],
               deliver: Callable[[list[str], Tensor], None]) -> None:
        """Re-run every recorded call on CPU and hand ``deliver(names, value)`` the final value of each storage
        that holds a ``wanted`` name. Leaves the CPU generator where a CPU construction would have left it."""
        wanted = set(wanted)
        names_of: dict[int, list[str]] = {}
        for name, key in sources.items():
            names_of.setdefault(key, []).append(name)
        needed = {key for key, names in names_of.items() if wanted.intersection(names)}
        last = {ev.key: i for i, ev in enumerate(self.events)}
        missing = sorted(name for name in wanted if sources.get(name) not in last)
        if missing:
            raise RuntimeError(f"no recorded initialisation for {missing[:5]}")
        torch.set_rng_state(self.rng_state)
        scratch: dict[int, Tensor] = {}
        for i, ev in enumerate(self.events):
            if ev.pure and ev.key not in needed:
                continue
            if ev.factory:
                kwargs = {**ev.kwargs, "device": "cpu"}
                scratch[ev.key] = ev.func(*ev.args, **kwargs)
            else:
                t = scratch.get(ev.key)
                if t is None:
                    t = scratch[ev.key] = torch.empty(ev.shape, dtype=ev.dtype)
                with torch.no_grad():
                    if "tensor" in ev.kwargs:
                        ev.func(*ev.args, **{**ev.kwargs, "tensor": t})
                    else:
                        ev.func(t, *ev.args[1:], **ev.kwargs)
            if last[ev.key] == i:
                value = scratch.pop(ev.key, None)
                if ev.key in needed and value is not None:
                    deliver([n for n in names_of[ev.key] if n in wanted], value)


def shard_slice(param: Tensor, full: Tensor) -> Tensor:
    """The part of ``full`` (the whole tensor) that ``param`` holds: its local shard for a DTensor
    (``Shard(d)`` / ``Replicate`` placements, ``torch.chunk`` split as FSDP2 and DTensor use), else ``full``."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor import Replicate, Shard  # torch.distributed is optional at import time

    mesh = param.device_mesh
    local = full
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:
            raise NotImplementedError(f"cannot slice a full tensor for placement {placement}")
        chunks = torch.chunk(local, mesh.size(mesh_dim), dim=placement.dim)
        index = mesh.get_local_rank(mesh_dim)
        local = chunks[index] if index < len(chunks) else local.narrow(placement.dim, 0, 0)
    return local


@torch.no_grad()
def assign_full(param: Tensor, full: Tensor) -> None:
    """Copy the whole-tensor value ``full`` into ``param`` (a plain tensor or a DTensor shard), casting to
    its dtype; only the shard's part of ``full`` is read (a memory-mapped ``full`` reads just those pages)."""
    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(f"shape {list(full.shape)} does not match the parameter's {list(param.shape)}")
    target = param.to_local() if hasattr(param, "to_local") else param
    target.copy_(shard_slice(param, full))


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim the pages now; file-backed ones are re-read on the next access


def release_pages(t: Tensor) -> None:
    """Ask the kernel to drop the resident pages of CPU tensor ``t`` from this process (Linux; elsewhere, or on
    failure, nothing happens). Values are kept: a memory-mapped file's pages are re-read if touched again, other
    pages stay or go to swap. Keeps a rank's resident set from counting the file pages it copied its slice from."""
    if t.device.type != "cpu" or not t.numel() or not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)
        except (OSError, AttributeError):
            pass


def materialise(module: nn.Module, device: torch.device | str, skip: Iterable[str] = ()) -> None:
    """Allocate (uninitialised) storage on ``device`` for every meta tensor of ``module``'s children, except
    the children named in ``skip`` (e.g. a frozen encoder that was built for real). Sharded parameters get
    storage for their shard only."""
    skip = set(skip)
    for name, child in module.named_children():
        if name in skip:
            continue
        if any(t.is_meta for t in (*child.parameters(), *child.buffers())):
            child.to_empty(device=device)
