"""A tiny, deterministic training run for the multi-process tests (run as a subprocess, never in pytest).

    python tests/dist_train.py --strategy single|ddp|fsdp --devices N --global-batch B --steps S --out W.pt

The data are generated here: row ``i`` of the dataset is a fixed random token sequence and image, so a
1-process run with batch B and an N-process run with B/N per rank see the same global batches (Lightning's
DistributedSampler gives rank r the rows r, r+N, ...; every row has the same number of targets, so the mean
loss of the global batch equals the mean of the per-rank means). After training, rank 0 writes the full
(gathered) trainable tensors and the global step to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from ibllm import tuning  # noqa: E402
from ibllm.distributed import shutdown_process_group  # noqa: E402
from ibllm.lit import FinetuneModule, PretrainModule  # noqa: E402


class Rows(Dataset):
    """``n`` fixed samples: tokens [S], labels = tokens, an image [3,224,224], inject True."""

    def __init__(self, n: int = 64, seq: int = 12, vocab: int = 512) -> None:
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(1000 + i)
        tokens = torch.randint(3, self.vocab, (self.seq,), generator=g)
        return {"tokens": tokens, "labels": tokens.clone(), "image": torch.rand(3, 224, 224, generator=g),
                "inject": torch.tensor(True)}


class Data(L.LightningDataModule):
    def __init__(self, batch_size: int, rows: int) -> None:
        super().__init__()
        self.batch_size, self.rows = batch_size, rows

    def train_dataloader(self) -> DataLoader:
        rows = Rows(self.rows)
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # rank r: rows r, r+N, ...
            from torch.utils.data import DistributedSampler

            sampler = DistributedSampler(rows, shuffle=False)
        return DataLoader(rows, batch_size=self.batch_size, sampler=sampler, shuffle=False, num_workers=0)


class StopAt(L.Callback):
    """Stop after ``step`` optimizer steps (the lr schedule still spans ``max_steps``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def full_trainables(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Trainable tensors gathered to full size (collective under FSDP: call on every rank)."""
    out = {}
    for name, p in tuning.trainable_parameters(module.model, module.stage):
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().float().cpu().clone()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=("single", "ddp", "fsdp"), required=True)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--stage", choices=("pretrain", "finetune"), default="pretrain")
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--stop-at", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--rows", type=int, default=64, help="dataset size (= global batch: every epoch is one step)")
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--frozen-dtype", default="float32")
    ap.add_argument("--act-ckpt", action="store_true")
    ap.add_argument("--root", required=True)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from lightning.fabric.plugins.environments import LightningEnvironment

    L.seed_everything(0, workers=True)
    if args.strategy == "single":
        strategy = "auto"
    elif args.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo")
    else:
        from ibllm.distributed import FSDP2Strategy

        strategy = FSDP2Strategy(process_group_backend="gloo")
    cls = PretrainModule if args.stage == "pretrain" else FinetuneModule
    module = cls(llm="tiny", imagebind="tiny", lr=2e-3, warmup_steps=0, frozen_dtype=args.frozen_dtype,
                 activation_checkpointing=args.act_ckpt)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, precision=args.precision,
                        max_steps=args.steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=args.root, use_distributed_sampler=False,
                        plugins=[LightningEnvironment()] if args.devices > 1 else None,
                        callbacks=[ModelCheckpoint(dirpath=os.path.join(args.root, "ckpt"), save_last=True,
                                                   every_n_train_steps=1, save_top_k=0),
                                   *([StopAt(args.stop_at)] if args.stop_at else [])])
    trainer.fit(module, datamodule=Data(args.global_batch // args.devices, args.rows), ckpt_path=args.resume)
    weights = full_trainables(module)
    if trainer.is_global_zero:
        torch.save({"weights": weights, "global_step": trainer.global_step,
                    "sharded": [n for n, p in module.model.named_parameters() if hasattr(p, "full_tensor")]},
                   args.out)
    shutdown_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo has (rarely) aborted there after a finished run
