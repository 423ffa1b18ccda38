"""Reading sharded (torch.distributed.checkpoint) checkpoint folders without ever running code from them.

A folder holds a ``.metadata`` index (pickled by DCP), one ``.distcp`` data file per rank and Lightning's
``meta.pt`` (loops, callbacks, hyper-parameters). DCP's own reader unpickles ``.metadata`` with plain
``pickle`` and every non-tensor entry of the data files (e.g. optimizer hyper-parameters) with
``torch.load(weights_only=False)``: a tampered folder could run code on load. Here:

* :class:`SafeFileSystemReader` unpickles ``.metadata`` through an allow-list of DCP's own metadata classes
  (anything else, e.g. a ``__reduce__`` payload, is refused before it is called);
* :class:`SafeLoadPlanner` loads every stored non-tensor object with ``torch.load(weights_only=True)``;
* :func:`read_sharded_meta` reads ``meta.pt`` with the weights-only loader (:func:`~ibllm.checkpoints.io.safe_load`).

Each refusal is a :class:`~ibllm.files.CheckpointError` naming the file.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from ibllm.checkpoints.io import SHARDED_META_FILE, safe_load
from ibllm.files import CheckpointError, PathLike

DCP_METADATA_FILE = ".metadata"

# (module, name) pairs a DCP ``.metadata`` pickle is made of; torch dtypes are added below.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the allow-listed DCP metadata classes and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def load_dcp_metadata(path: PathLike) -> Metadata:
    """Unpickle a DCP ``.metadata`` file through the allow-list; :class:`CheckpointError` naming it otherwise."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"sharded checkpoint index not found: {p}") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load sharded checkpoint index {p}: it holds objects other than "
                              f"checkpoint metadata, and unpickling it could execute code ({e})") from None
    except Exception as e:  # truncated or garbage files raise many types
        raise CheckpointError(f"cannot read sharded checkpoint index {p}: corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"sharded checkpoint index {p} holds a {type(metadata).__name__}, expected DCP Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader with the allow-list unpickler for ``.metadata`` (see the module doc)."""

    def read_metadata(self) -> Metadata:  # no ``rank``: DCP must not fall back to per-rank index files
        """The folder's ``.metadata`` index, unpickled through the allow-list."""
        metadata = load_dcp_metadata(Path(self.path) / DCP_METADATA_FILE)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that stored non-tensor objects load weights-only."""

    def __init__(self, folder: PathLike, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.folder = Path(folder)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Unpickle one stored object with the weights-only loader, then store it like the default planner."""
        try:
            obj = torch.load(value, weights_only=True, map_location="cpu")
        except Exception as e:
            raise CheckpointError(f"refusing to load {read_item.storage_index.fqn!r} from "
                                  f"{self._data_file(read_item)}: it is not a plain value or tensor, and "
                                  f"unpickling it could execute code ({_first_line(e)})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

    def _data_file(self, read_item: ReadItem) -> Path:
        storage = getattr(self.metadata, "storage_data", None) or {}
        info = storage.get(read_item.storage_index)
        return self.folder / info.relative_path if info is not None else self.folder


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "WeightsUnpickler error" in ln or "Unsupported global" in ln),
                  lines[0] if lines else type(e).__name__)
    return detail.split(". Please")[0]


def safe_dcp_load(state: dict[str, Any], folder: PathLike, no_dist: bool = False) -> None:
    """``dcp.load(state)`` from ``folder`` through :class:`SafeFileSystemReader` and :class:`SafeLoadPlanner`.

    A refusal on any rank is re-raised as that :class:`CheckpointError` (DCP wraps it in its own exception).
    """
    import torch.distributed.checkpoint as dcp  # the package root pulls in the whole DCP stack
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(folder)), planner=SafeLoadPlanner(folder),
                 no_dist=no_dist)
    except CheckpointException as e:
        for failure in e.failures.values():
            exc = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(exc, CheckpointError):
                raise CheckpointError(str(exc)) from None
        raise


def read_sharded_meta(path: PathLike) -> dict[str, Any]:
    """Lightning's non-tensor state of a sharded folder (``meta.pt``), loaded weights-only."""
    return safe_load(Path(path) / SHARDED_META_FILE, "sharded checkpoint metadata", mmap=False)


def is_sharded_folder(path: PathLike) -> bool:
    """True for a DCP checkpoint folder (it has a ``.metadata`` index)."""
    p = Path(path)
    return p.is_dir() and (p / DCP_METADATA_FILE).is_file()
