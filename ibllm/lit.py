"""LightningModules for stage 1 (pretrain) and stage 2 (finetune) — thin wrappers around ImageBindLLM.

Both share one model class and differ only in the stage filter (:mod:`ibllm.tuning`) and their data.
Checkpoints hold the trainable parameters plus optimizer/scheduler/loop state, never the frozen
LLaMA / ImageBind weights: those are rebuilt from the same base files on resume.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from argparse import ArgumentError
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from ibllm import tuning
from ibllm.build import build_model, build_model_on_meta, check_sources, finish_on_meta, load_tokenizer_for
from ibllm.checkpoints.adapters import base_fingerprint, load_trainable
from ibllm.checkpoints.lightning_io import use_atomic_checkpoint_io
from ibllm.checkpoints.recovery import check_finite_trainables, reset_optimizer_state, resolve_resume
from ibllm.lit_config import PLACEHOLDER, unfilled_placeholders  # noqa: F401 - also importable from here
from ibllm.lit_config import BASE_CONFIG, explicit_data_tokenizers, link_run_arguments, tokenizer_conflict
from ibllm.models.ibllm import ImageBindLLM, lm_loss, loss_positions, selected_lm_loss
from ibllm.processing.shards import SkipTally
from ibllm.verbs.errors import CommandLineError, check_yaml_files, explain, report
from ibllm.verbs.registry import PROG


FUSED_ADAMW_DEVICES = ("cpu", "cuda", "xpu", "mps")


def fused_adamw_supported(params: list[Tensor]) -> bool:
    """True when torch's single-kernel AdamW can step every tensor of ``params`` (floating point, on a
    device with the fused kernel; sharded DTensors are judged by their local shard)."""
    for param in params:
        local = param.to_local() if hasattr(param, "to_local") else param
        if not local.is_floating_point() or local.device.type not in FUSED_ADAMW_DEVICES:
            return False
    return True


def make_adamw(groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over ``groups``: the fused kernel where every parameter supports it, else torch's default path.

    Both compute the same update (equal up to float rounding); fused makes one pass over the parameters,
    several times faster than torch's default path for the hundreds of millions of stage-1 parameters.
    """
    params = [p for group in groups for p in group["params"]]
    if fused_adamw_supported(params):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


class ImageBindLLMModule(L.LightningModule):
    """Trains one stage of ImageBind-LLM.

    Args:
        llm: LLaMA source — preset name (random weights), ``smollm2-135m-instruct``, or a Meta / HF / GGUF path.
        tokenizer: tokenizer file; default: the one that comes with ``llm``.
        imagebind: ImageBind preset of the frozen encoder (``huge`` for real runs).
        imagebind_weights: encoder weights (``imagebind_huge.pth`` layout); None = random frozen towers.
        modalities: encoder branches to build (stage 1 needs ``vision`` only; [] for precomputed features).
        init_from: trainable weights to start from: a stage-1 checkpoint (ours) or an official file.
        lr: absolute peak learning rate; ignored when ``blr`` is set.
        blr: base learning rate; peak lr = blr x global_batch / 256 (the official rule).
        weight_decay: AdamW weight decay on >=2-D trainable tensors (1-D tensors and biases get none).
        warmup_steps: linear warmup length in optimizer steps (or ``warmup_fraction`` of all steps).
        min_lr: the cosine schedule's floor.
        frozen_dtype: storage dtype of frozen weights (``bfloat16`` halves their memory); trainables stay fp32.
        sample_every_n_steps: log a few greedy generations to TensorBoard every N steps (0 = off).
        activation_checkpointing: under FSDP2 (``ibllm.distributed.FSDP2Strategy``), recompute each LLaMA
            block's activations in backward (see the README's memory plan).
        meta_init: under FSDP2, build the LLaMA and bind network on the meta device and give each rank only its
            shards (base weights memory-mapped); False builds the whole model on every rank first.
        reset_optimizer: on resume, start AdamW moments afresh and put the lr schedule's peak at this run's
            ``lr`` / ``blr`` (the schedule keeps its position); for recovering from a divergence.
        batch_size: samples per process and step, for ``blr`` (the command line links it from
            ``data.init_args.batch_size``).
    """

    stage: str = "finetune"

    def __init__(self, llm: str = "tiny", tokenizer: str | None = None, imagebind: str = "tiny",
                 imagebind_weights: str | None = None, modalities: list[str] | None = None,
                 init_from: str | None = None, lr: float = 1e-4, blr: float | None = None,
                 weight_decay: float = 0.05, warmup_steps: int = 0, warmup_fraction: float | None = None,
                 min_lr: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), frozen_dtype: str = "float32",
                 sample_every_n_steps: int = 0, sample_max_gen_len: int = 24, seed: int = 0,
                 activation_checkpointing: bool = False, reset_optimizer: bool = False, meta_init: bool = True,
                 batch_size: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: ImageBindLLM | None = None
        self.strict_loading = False  # checkpoints hold only the trainable parameters
        self._last_step_time: float | None = None
        self.skips = SkipTally()  # bad-sample counts the caption batches carry, summed over readers

    # ---- model ---------------------------------------------------------------------------------
    def check_inputs(self) -> None:
        """Check the files and presets the model will be built from, before anything is built or written
        (:class:`~ibllm.files.InputError` naming the setting and the file)."""
        hp = self.hparams
        check_sources(hp.llm, hp.tokenizer, hp.imagebind, hp.imagebind_weights, hp.init_from, "model.init_args.")

    def configure_model(self) -> None:
        """Build the model once (Lightning calls this before fit/resume; safe to call again)."""
        if self.model is not None:
            self._shard_if_distributed()
            return
        hp = self.hparams
        modalities = ["vision"] if hp.modalities is None else list(hp.modalities)
        if getattr(self, "_device_mesh", None) is not None and hp.get("meta_init", True):
            self._build_sharded(modalities)
            return
        self.model = build_model(hp.llm, self.stage, hp.imagebind, hp.imagebind_weights, modalities, hp.seed)
        if hp.init_from:
            load_trainable(self.model, hp.init_from)
        if hp.frozen_dtype != "float32":
            tuning.cast_frozen(self.model, getattr(torch, hp.frozen_dtype))
        self._shard_if_distributed()

    def _build_sharded(self, modalities: list[str]) -> None:
        """Build on the meta device, shard, then let each rank materialise and load only its shards (values equal
        to the one-process build's; the base file is memory-mapped / read per tensor)."""
        hp = self.hparams
        model, deferred = build_model_on_meta(hp.llm, self.stage, hp.imagebind, hp.imagebind_weights, modalities,
                                              hp.seed)
        if hp.frozen_dtype != "float32":
            tuning.cast_frozen(model, getattr(torch, hp.frozen_dtype))
        self.model = model
        self._shard_if_distributed()
        finish_on_meta(model, deferred, self.trainer.strategy.root_device)
        if hp.init_from:
            load_trainable(model, hp.init_from)
        base_fingerprint(model)  # collective under FSDP: every rank gathers the slices it hashes

    def _shard_if_distributed(self) -> None:
        """Under ModelParallelStrategy (a device mesh is set): FSDP2-shard the model (idempotent)."""
        if getattr(self, "_device_mesh", None) is None:
            return
        from ibllm.distributed import precision_param_dtype, shard_model

        shard_model(self.model, self.device_mesh, precision_param_dtype(self.trainer.precision),
                    activation_checkpointing=self.hparams.get("activation_checkpointing", False))

    def tokenizer(self):
        """The LLM tokenizer (loaded lazily; used for logged samples)."""
        if not hasattr(self, "_tokenizer"):
            self._tokenizer = load_tokenizer_for(self.hparams.llm, self.hparams.tokenizer)
        return self._tokenizer

    def forward(self, batch: dict[str, Any], logits_at: Tensor | None = None) -> Tensor:
        """Logits ``[B,S,V]`` of a training batch (``tokens`` + ``image`` or ``feature`` [+ ``inject``]);
        ``[N,V]`` at the True positions of ``logits_at [B,S]``."""
        return self.model(batch["tokens"], image=batch.get("image") if "feature" not in batch else None,
                          feature=batch.get("feature"), inject=batch.get("inject"), logits_at=logits_at)

    def loss(self, batch: dict[str, Any]) -> Tensor:
        """The batch's next-token loss, projecting to the vocabulary only where a label counts."""
        labels = batch["labels"]
        at = loss_positions(labels)
        if not bool(at.any()):  # no target at all: lm_loss keeps the graph alive with a zero loss
            return lm_loss(self(batch), labels)
        return selected_lm_loss(self(batch, logits_at=at), labels)

    # ---- steps ---------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss.item()}) at global step {self.global_step} "
                                     f"(batch {batch_idx}); stopping. Lower the learning rate or check the data.")
        bsz = batch["tokens"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bsz)
        self._log_throughput(batch)
        self.skips.update(batch)
        for reason, count in self.skips.totals.items():
            self.log(f"data/skipped_{reason}", float(count), batch_size=bsz)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Lightning's step, then stop at this step if a trainable weight is no longer finite."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        check_finite_trainables(self.model, self.stage, self.global_step + 1)

    def on_train_start(self) -> None:
        """With ``reset_optimizer`` on a resumed run: fresh optimizer state at this run's peak lr."""
        if self.hparams.get("reset_optimizer") and self.trainer.ckpt_path:
            reset_optimizer_state(self.trainer, self.peak_lr())

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self.skips.update(batch)  # held-out skips join the totals logged by the next training step
        loss = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["tokens"].shape[0], sync_dist=True)
        return loss

    def _log_throughput(self, batch: dict[str, Any]) -> None:
        now = time.perf_counter()
        if self._last_step_time is not None:
            elapsed = max(now - self._last_step_time, 1e-9)
            tokens = int((batch["tokens"] != 0).sum()) * self.trainer.world_size
            self.log("perf/tokens_per_s", tokens / elapsed, batch_size=1)
            self.log("perf/samples_per_s", batch["tokens"].shape[0] * self.trainer.world_size / elapsed, batch_size=1)
        self._last_step_time = now

    # ---- optimisation --------------------------------------------------------------------------
    def peak_lr(self) -> float:
        """Absolute lr, from ``blr`` x global batch / 256 when ``blr`` is set."""
        if self.hparams.blr is None:
            return self.hparams.lr
        batch = self.hparams.get("batch_size")
        if batch is None:
            raise ValueError("blr needs batch_size (samples per process and step) to compute the global batch; "
                             "the command line links it from data.init_args.batch_size")
        return self.hparams.blr * batch * self.trainer.accumulate_grad_batches * self.trainer.world_size / 256

    def configure_optimizers(self):
        groups = tuning.optimizer_groups(self.model, self.stage, self.hparams.weight_decay)
        optimizer = make_adamw(groups, lr=self.peak_lr(), betas=tuple(self.hparams.betas))
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("set trainer.max_steps: the schedule needs a known number of optimizer steps")
        total = int(total)
        warmup = self.hparams.warmup_steps
        if self.hparams.warmup_fraction is not None:
            warmup = int(self.hparams.warmup_fraction * total)
        min_ratio = self.hparams.min_lr / max(self.peak_lr(), 1e-12)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: tuning.warmup_cosine(s, warmup, total, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable tensors, plus what is needed to rebuild and check the frozen base."""
        prefix = "model."
        trainable = tuning.trainable_state_dict(self.model, self.stage)
        checkpoint["state_dict"] = {prefix + k: v for k, v in trainable.items()}
        checkpoint["ibllm"] = {"stage": self.stage, "llm": self.hparams.llm, "imagebind": self.hparams.imagebind,
                               "imagebind_weights": self.hparams.imagebind_weights,
                               "llama_config": self.model.cfg.to_dict(),
                               "base_fingerprint": base_fingerprint(self.model)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("ibllm", {})
        if meta.get("stage", self.stage) != self.stage:
            raise ValueError(f"checkpoint is from stage {meta['stage']!r}; resuming needs stage {self.stage!r} "
                             f"(to start stage 2 from stage 1, pass it as model.init_from)")
        if self.model is not None and "llama_config" in meta and meta["llama_config"] != self.model.cfg.to_dict():
            raise ValueError("checkpoint was trained on a different LLaMA shape: "
                             f"{meta['llama_config']} vs {self.model.cfg.to_dict()}")


class PretrainModule(ImageBindLLMModule):
    """Stage 1: bind network, prefix queries and gates on image–caption pairs."""

    stage = "pretrain"


class FinetuneModule(ImageBindLLMModule):
    """Stage 2: LoRA, biases and norms on instruction data."""

    stage = "finetune"


class ImageBindLightningCLI(LightningCLI):
    """LightningCLI with the shared defaults of ``experiments/base.yaml`` read first, the checkpoint, exception
    checkpoint, lr and gate monitors and the visual-cache builder as configurable callbacks (``--checkpoint.*``,
    ``--exception_checkpoint``, ``--lr_monitor.*``, ``--gate_monitor``, ``--visual_cache``; ``null`` switches
    one off), and the links of :func:`ibllm.lit_config.link_run_arguments`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        base = [str(BASE_CONFIG)] if BASE_CONFIG.is_file() else []
        for sub in self.subcommands():  # (base.yaml holds fit's weights_only: only the subcommands read it)
            parser_kwargs[sub] = {"default_config_files": base, **(parser_kwargs.get(sub) or {})}
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(L.Callback, "exception_checkpoint", subclass_mode=True, required=False)
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(L.Callback, "gate_monitor", subclass_mode=True, required=False)
        parser.add_lightning_class_args(L.Callback, "visual_cache", subclass_mode=True, required=False)
        link_run_arguments(parser)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        tokens = sys.argv[1:] if args is None else args
        if not isinstance(tokens, (list, tuple)):
            return
        sub = self.config.get("subcommand")  # (self.subcommand is set after this method)
        config = self.config[sub] if sub else self.config
        model = config.get("model")
        init = model.get("init_args") if model is not None and hasattr(model, "get") else None
        if init is None or not hasattr(init, "get"):
            return
        problem = tokenizer_conflict(explicit_data_tokenizers(tokens), init.get("llm"), init.get("tokenizer"))
        if problem:
            parser.error(problem)

    def before_instantiate_classes(self) -> None:
        missing = unfilled_placeholders(self.config[self.subcommand] if self.subcommand else self.config)
        if missing:
            raise SystemExit("the experiment still has placeholder values; set them in the YAML or with "
                             "flags:\n  " + "\n  ".join(f"--{key}" for key in missing))

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> L.Trainer:
        # Shared callbacks switched off (--gate_monitor null), or of a class the experiment lists itself in
        # trainer.callbacks (its own ModelCheckpoint, ...), are left out.
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        kept = [cb for cb in callbacks if cb is not None
                and not any(isinstance(own, type(cb)) or isinstance(cb, type(own)) for own in listed)]
        if config.get("logger") is False or config.get("logger") == []:  # --trainer.logger false: nothing to log to
            kept = [cb for cb in kept if not isinstance(cb, LearningRateMonitor)]
        return super()._instantiate_trainer(config, kept)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer.strategy)  # checkpoints written beside their target, then renamed
        return trainer

    def _parse_ckpt_path(self) -> None:
        # Lightning would overwrite the model arguments with the checkpoint's hyper-parameters, so that a
        # new lr given on resume is ignored; the experiment and its flags define the run, and before_fit
        # checks the checkpoint (module.on_load_checkpoint checks its stage and LLaMA shape).
        return

    def before_fit(self) -> None:
        # "last" (automatic with an exception checkpoint) = the most steps, not the newest file
        config = self.config_init[self.subcommand]
        config["ckpt_path"] = resolve_resume(self.trainer, config.get("ckpt_path"),
                                             say=lambda text: print(text, file=sys.stderr, flush=True))
        # a bad input is refused here, with one line naming it, before the run writes anything
        for part in (self.model, self.datamodule):
            if callable(getattr(part, "check_inputs", None)):
                part.check_inputs()

    def after_fit(self) -> None:
        # Result lines of evaluation callbacks end the output, after the progress bar's last redraw.
        for callback in self.trainer.callbacks:
            if getattr(callback, "summary", None):
                print(callback.summary, flush=True)


def lightning_cli(argv: list[str]) -> ImageBindLightningCLI:
    """Run ``argv`` (``fit --config X.yaml [--dotted.flags]``) with :class:`ImageBindLightningCLI` (any
    :class:`ImageBindLLMModule` and LightningDataModule by class path, OmegaConf interpolation on)."""
    return ImageBindLightningCLI(ImageBindLLMModule, L.LightningDataModule, subclass_mode_model=True,
                                 subclass_mode_data=True, args=None if argv == sys.argv[1:] else argv,
                                 parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False, "prog": PROG},
                                 save_config_kwargs={"overwrite": True},
                                 auto_configure_optimizers=False)


def run_lightning_cli(argv: list[str]) -> None:
    """``python -m ibllm fit --config X.yaml [--dotted.flags]``: :func:`lightning_cli`, with SIGTERM as exit status
    143 and the process group shut down."""
    from ibllm.distributed import shutdown_process_group

    prog = f"{PROG} {argv[0]}" if argv else PROG
    try:
        check_yaml_files(argv)  # a YAML syntax error names the file and line, not "<unicode string>"
        lightning_cli(argv)
    except CommandLineError as err:
        report(prog, str(err))
    except ArgumentError as err:  # a bad option or config value: one line (file, key, expected), no usage dump
        report(prog, explain(err, argv, kebab=False))
    except SIGTERMException:  # Lightning stops with exit status 0; an interrupted run must not look done
        raise SystemExit(128 + signal.SIGTERM) from None
    shutdown_process_group()
