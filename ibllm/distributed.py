"""FSDP2 for ImageBind-LLM: per-block sharding and a strategy for trainable-only sharded checkpoints.

Lightning's ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` calls
``LightningModule.configure_model`` with a device mesh; :func:`shard_model` then applies
``torch.distributed.fsdp.fully_shard`` to every LLaMA ``TransformerBlock`` and to the root.

Dtypes. Frozen weights are stored in bf16 (``frozen_dtype: bfloat16``), trainable ones in fp32
(:func:`ibllm.tuning.apply_stage`), and both live in the same block (e.g. a frozen ``wq`` next to the
trainable ``gate``). FSDP2 (torch >= 2.6, checked on 2.13) requires a uniform *original* dtype and a
uniform reduce dtype only among the **trainable** parameters of one group (``FSDPParamGroup._init_mp_dtypes``);
frozen parameters may differ, and an all-gather of mixed input dtypes is packed into one uint8 buffer.
With ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` the fp32 trainables are gathered and
computed in bf16 (frozen bf16 ones need no cast), gradients are reduce-scattered in fp32 and the
optimizer steps on fp32 shards. So no separate sharding of trainables is needed; :func:`shard_model`
checks the invariant and fails with a clear message if a group ever mixes trainable dtypes.

Visual injection. ``LLaMA.adapter_states`` projects the visual token through each query layer's frozen
``wv`` *outside* that block's ``forward``. A sharded block's weights exist only as shards there, so the
projection is routed through a block method registered with ``register_fsdp_forward_method``: FSDP
unshards the block for it and registers the pre-backward hooks that re-gather ``wv`` for its backward.
(Cost: one extra all-gather of each query block per forward and per backward.)

Checkpoints. Lightning saves a directory (torch.distributed.checkpoint, one file per rank +
``meta.pt``) holding what :meth:`ibllm.lit.ImageBindLLMModule.on_save_checkpoint` leaves in
``state_dict``: the trainable tensors only (sharded DTensors). Lightning's loader asks DCP for *every*
model key, which such a checkpoint lacks, so :class:`FSDP2Strategy` loads the trainable subset only.
:mod:`ibllm.checkpoints.consolidate` (``python -m ibllm consolidate CKPT_DIR --out FILE``) turns that
directory into the trainable-only file, offline.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ibllm.checkpoints.adapters import base_fingerprint
from ibllm.checkpoints.io import CheckpointError
from ibllm.checkpoints.lightning_io import save_sharded_atomic, use_atomic_checkpoint_io
from ibllm.checkpoints.sharded import SafeFileSystemReader, read_sharded_meta, safe_dcp_load
from ibllm.models.llama import AdapterState, Attention

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------------------
def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _check_trainable_dtypes(module: nn.Module, name: str, skip: set[int]) -> None:
    """FSDP2 needs one original dtype among the trainable parameters of a group (frozen ones may differ)."""
    dtypes = {p.dtype for p in module.parameters() if p.requires_grad and id(p) not in skip}
    if len(dtypes) > 1:
        raise ValueError(f"FSDP2 group {name!r} mixes trainable parameter dtypes {sorted(map(str, dtypes))}; "
                         "keep every trainable parameter in fp32 (ibllm.tuning.apply_stage does)")


def _adapter_state_via_block(block: nn.Module, adapter: Tensor) -> tuple[Tensor, Tensor | None]:
    """Project ``adapter`` with the block's frozen wv/wk; runs under FSDP's unshard hooks (see module doc)."""
    state = Attention.adapter_state(block.attention, adapter)
    # copies, not views: FSDP's pre-backward hook must not sit on a view (its warning about in-place ops)
    return state.values.clone(), None if state.keys is None else state.keys.clone()


def _route_adapter_projection(block: nn.Module) -> None:
    """Make ``block.attention.adapter_state`` go through a block method that FSDP unshards for."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    block.ibllm_adapter_state = functools.partial(_adapter_state_via_block, block)
    register_fsdp_forward_method(block, "ibllm_adapter_state")

    def adapter_state(adapter: Tensor) -> AdapterState:
        values, keys = block.ibllm_adapter_state(adapter)
        return AdapterState(values, keys)

    block.attention.adapter_state = adapter_state  # instance attribute shadows the method


def _checkpoint_forward(block: nn.Module) -> None:
    """Recompute ``block``'s activations in backward (non-reentrant checkpoint; parameter names unchanged)."""
    from torch.utils.checkpoint import checkpoint

    inner = block.forward

    def forward(*args: Any, **kwargs: Any) -> Tensor:
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward


def shard_model(model: nn.Module, mesh: Any, param_dtype: torch.dtype | None = torch.bfloat16,
                reduce_dtype: torch.dtype | None = torch.float32, activation_checkpointing: bool = False,
                shard_encoder: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 to an :class:`~ibllm.models.ibllm.ImageBindLLM` in place and return it.

    Every LLaMA ``TransformerBlock`` becomes one FSDP unit, then the root (embeddings, final norm, output,
    bind network, prefix queries) is sharded. The ImageBind encoder stays replicated (its parameters are
    ignored by FSDP) unless ``shard_encoder``, which makes it one more unit (see the README's memory plan
    for why replication is the default). Modules that are already sharded are skipped, so calling this
    twice is harmless. LoRA must already be injected (the model constructor does it).

    Args:
        model: the ImageBindLLM (or anything with ``.llama.layers``).
        mesh: the data-parallel device mesh (Lightning: ``self.device_mesh["data_parallel"]``); a 2-D mesh
            with a ``data_parallel`` dimension is accepted too.
        param_dtype: all-gather / compute dtype of parameters (None = their storage dtype).
        reduce_dtype: gradient reduce-scatter dtype (fp32 keeps the fp32 optimizer shards exact).
        activation_checkpointing: recompute each block's activations in backward.
        shard_encoder: shard the frozen encoder instead of replicating it.
        reshard_after_forward: free gathered block weights after forward (ZeRO-3); False keeps them (ZeRO-2).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is not None and getattr(mesh, "mesh_dim_names", None) and "data_parallel" in mesh.mesh_dim_names \
            and mesh.ndim > 1:
        mesh = mesh["data_parallel"]
    if _is_sharded(model):
        return model
    if not any(p.is_meta for p in model.parameters()):
        base_fingerprint(model)  # cached while the weights are whole (checkpoints record it)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    kwargs = {"mesh": mesh, "mp_policy": policy}
    llama = model.llama
    first_query = getattr(llama, "first_query_layer", 0)
    for index, block in enumerate(llama.layers):
        if _is_sharded(block):
            continue
        _check_trainable_dtypes(block, f"llama.layers.{index}", set())
        if activation_checkpointing:
            _checkpoint_forward(block)
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
        if index >= first_query:
            _route_adapter_projection(block)
    ignored: set[nn.Parameter] = set()
    encoder = getattr(model, "image_bind", None)
    if encoder is not None:
        if shard_encoder:
            if not _is_sharded(encoder):
                fully_shard(encoder, reshard_after_forward=True, **kwargs)
        else:
            ignored = set(encoder.parameters())
    _check_trainable_dtypes(model, "root", {id(p) for p in ignored})
    # The root's weights are needed again right at the start of backward (output projection): keep them.
    fully_shard(model, reshard_after_forward=False, ignored_params=ignored or None, **kwargs)
    return model


def shutdown_process_group() -> None:
    """Destroy the default process group, if any, once every rank is done with it.

    Left to interpreter exit, gloo's threads can be torn down out of order and abort the process
    ("terminate called without an active exception") after a successful run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def precision_param_dtype(precision: Any) -> torch.dtype | None:
    """FSDP2 ``param_dtype`` for a Lightning precision string: bf16 for ``bf16-*``, else None (storage dtype)."""
    text = str(precision)
    if text.startswith("bf16"):
        return torch.bfloat16
    if text.startswith("16"):
        return torch.float16
    return None


# --------------------------------------------------------------------------------------------------------
# Lightning strategy: trainable-only sharded checkpoints
# --------------------------------------------------------------------------------------------------------
def _strategy_base():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


class FSDP2Strategy(_strategy_base()):
    """``ModelParallelStrategy`` whose sharded checkpoints hold only the trainable tensors.

    Saving is Lightning's (a directory, one DCP file per rank + ``meta.pt``; the LightningModule's
    ``on_save_checkpoint`` drops the frozen tensors). Loading asks DCP only for the keys the checkpoint
    has, then loads optimizer states and returns the metadata — the frozen weights come from the base files
    the model was built from. ``data_parallel_size`` defaults to the world size (pure FSDP).

    Args:
        data_parallel_size: devices per data-parallel (sharding) group; ``"auto"`` = all processes.
        tensor_parallel_size: 1 (no tensor parallelism in this project).
        save_distributed_checkpoint: False gathers a single-file checkpoint on rank 0 instead.
        process_group_backend: e.g. ``gloo`` for CPU, ``nccl`` for GPUs (default: by device).
    """

    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int | str = 1,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        use_atomic_checkpoint_io(self)  # single-file saves: written beside the target, then renamed

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """A sharded folder is written as a hidden sibling folder, then renamed into place (a kill never
        leaves a partial folder under the final name); single files go through the checkpoint IO."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        parent_save = super().save_checkpoint
        save_sharded_atomic(self, lambda tmp: parent_save(checkpoint, tmp, storage_options), filepath)

    def setup_environment(self) -> None:
        """Resolve ``data_parallel_size="auto"`` to the world size (Lightning's default is the node count)."""
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a trainable-only sharded checkpoint (or defer to Lightning for a single file)."""
        from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint

        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        return load_sharded_trainable(path, self.model, self.optimizers)


def load_sharded_trainable(path: Path, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    """Load the tensors a sharded checkpoint holds into ``module`` (others keep their values), then the
    optimizer states; return the remaining metadata (loops, callbacks, hparams, ``ibllm``)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_optimizer_state_dict)

    reader = SafeFileSystemReader(str(path))
    stored = {key.removeprefix("state_dict."): key for key in reader.read_metadata().state_dict_metadata
              if key.startswith("state_dict.")}
    full = get_model_state_dict(module)
    unknown = sorted(k for k in stored if k not in full)
    if unknown:
        raise CheckpointError(f"{path}: checkpoint keys the model does not have: {unknown[:5]}")
    wanted = {"state_dict": {k: v for k, v in full.items() if k in stored}}
    safe_dcp_load(wanted, path)
    module.load_state_dict(wanted["state_dict"], strict=False)
    for index, optimizer in enumerate(optimizers):
        key = f"optimizer_{index}"
        optim_state = {key: get_optimizer_state_dict(module, optimizer)}
        safe_dcp_load(optim_state, path)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state[key],
                                 options=StateDictOptions(cpu_offload=True))
    return read_sharded_meta(path)
