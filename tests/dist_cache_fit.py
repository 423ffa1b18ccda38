"""A tiny stage-1 fit whose CacheBuilder callback builds a visual cache when training finishes (run as a
subprocess by tests/test_cache_callback.py, never inside pytest).

    python tests/dist_cache_fit.py --devices N --root DIR --shards PATTERN --weights VISION.safetensors --out CACHE
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from lightning.fabric.plugins.environments import LightningEnvironment  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from callbacks.cache_builder import CacheBuilder  # noqa: E402
from dist_train import Data  # noqa: E402
from ibllm.distributed import shutdown_process_group  # noqa: E402
from ibllm.lit import PretrainModule  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--root", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    L.seed_everything(0, workers=True)
    multi = args.devices > 1
    module = PretrainModule(llm="tiny", imagebind="tiny", imagebind_weights=args.weights, lr=1e-3)
    builder = CacheBuilder(args.shards, args.out, batch_size=3, workers=1, show_progress=False)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, max_steps=args.steps, logger=False,
                        strategy=DDPStrategy(process_group_backend="gloo") if multi else "auto",
                        plugins=[LightningEnvironment()] if multi else None, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=args.root, use_distributed_sampler=False, callbacks=[builder])
    trainer.fit(module, datamodule=Data(2, 16))
    print(f"rank {trainer.global_rank}: step {trainer.global_step}, encoded {builder.result['shards_encoded']} "
          f"of {builder.result['shards']} shards", flush=True)
    shutdown_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo has (rarely) aborted there after a finished run
