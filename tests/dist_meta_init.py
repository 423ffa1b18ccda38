"""Build a model, FSDP2-shard it over gloo processes, and save what it computes (run as a subprocess, never
inside pytest).

    python tests/dist_meta_init.py --llm PRESET_OR_PATH --stage pretrain|finetune --out RESULT.pt [--old]

Without ``RANK`` / ``WORLD_SIZE`` in the environment the model is the one-process build (no sharding). With
them (``MASTER_ADDR`` / ``MASTER_PORT`` too) every rank builds on the meta device (``--old``: the whole model
first), shards with :func:`ibllm.distributed.shard_model` and materialises its shards. Rank 0 saves every
tensor gathered to full size after initialisation, the logits of a fixed batch, and the trainable tensors
after one AdamW step on that batch (the same batch on every rank, so the averaged gradient is the
one-process gradient).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ibllm import tuning  # noqa: E402
from ibllm.build import build_model, build_model_on_meta, finish_on_meta  # noqa: E402
from ibllm.checkpoints.adapters import base_fingerprint  # noqa: E402
from ibllm.models.ibllm import lm_loss  # noqa: E402


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered when sharded; collective), as fp32 on the CPU."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).float().cpu().clone()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", default="tiny")
    ap.add_argument("--stage", default="pretrain")
    ap.add_argument("--frozen-dtype", default="float32")
    ap.add_argument("--old", action="store_true", help="sharded run: build the whole model first")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from ibllm.distributed import shard_model

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("data_parallel",))
    dtype = getattr(torch, args.frozen_dtype)
    if distributed and not args.old:
        model, deferred = build_model_on_meta(args.llm, args.stage, "tiny", None, ["vision"], seed=0)
        tuning.cast_frozen(model, dtype)
        shard_model(model, mesh, param_dtype=None)
        finish_on_meta(model, deferred, "cpu")
    else:
        model = build_model(args.llm, args.stage, "tiny", None, ["vision"], seed=0)
        tuning.cast_frozen(model, dtype)
        if distributed:
            shard_model(model, mesh, param_dtype=None)
    rng_after_init = torch.get_rng_state()
    init = {name: full(p) for name, p in model.named_parameters()}
    fingerprint = base_fingerprint(model)

    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(3, model.cfg.vocab_size, (2, 10), generator=g)
    image = torch.rand(2, 3, 224, 224, generator=g)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):  # as bf16-mixed does
        logits = model(tokens, image=image)
    loss = lm_loss(logits, tokens)
    loss.backward()
    optimizer = torch.optim.AdamW([p for _, p in tuning.trainable_parameters(model, args.stage)], lr=1e-2)
    optimizer.step()
    stepped = {name: full(p) for name, p in tuning.trainable_parameters(model, args.stage)}
    if not distributed or dist.get_rank() == 0:
        torch.save({"init": init, "logits": full(logits), "stepped": stepped, "fingerprint": fingerprint,
                    "rng_after_init": rng_after_init,
                    "sharded": [n for n, p in model.named_parameters() if hasattr(p, "full_tensor")]}, args.out)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo has (rarely) aborted there after a finished run
