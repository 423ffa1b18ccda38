"""Experiment configuration through the training command line: the shared base, settings derived from
``trainer.default_root_dir``, the model's tokenizer reaching the data, the data's batch size reaching the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ibllm.lit import lightning_cli, run_lightning_cli
from ibllm.lit_config import BASE_CONFIG, explicit_data_tokenizers, tokenizer_conflict
from ibllm.slurm import experiment_settings

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").glob("*.yaml") if p.name != "base.yaml"
                     and not p.name.startswith("stage0_"))
SHARED = ("logger", "ModelCheckpoint", "SafeExceptionCheckpoint", "LearningRateMonitor", "dirpath", "save_dir",
          "weights_only", "seed_everything")


@pytest.fixture(scope="module")
def other_sp_model(tmp_path_factory) -> str:
    """A second sentencepiece model with another vocabulary (80 pieces)."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp_other")
    (folder / "corpus.txt").write_text("\n".join(f"zebra {i} quartz {i * 7} jumps over lazy dogs" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "sp"), vocab_size=80,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, model_type="bpe", minloglevel=2)
    return str(folder / "sp.model")


def write_experiment(folder: Path, model_tokenizer: str, shards: str, **data: str) -> Path:
    """A tiny stage-1 experiment that says only what is particular to it (the rest comes from base.yaml)."""
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": "runs/exp"},
        "checkpoint": {"every_n_train_steps": 1},
        "model": {"class_path": "ibllm.lit.PretrainModule",
                  "init_args": {"llm": "tiny", "tokenizer": model_tokenizer, "imagebind": "tiny", "blr": 1.0e-3}},
        "data": {"class_path": "datamodules.WebDatasetCaptions",
                 "init_args": {"train": shards, "batch_size": 2, "num_workers": 0, "samples_per_epoch": 8,
                               "max_words": 64, "shuffle_buffer": 4, **data}},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def printed_config(argv: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as stop:
        run_lightning_cli([*argv, "--print_config"])
    assert stop.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiments_say_only_what_is_particular_and_read_the_base(experiment, capsys):
    raw = yaml.safe_load(experiment.read_text())
    settings = yaml.safe_dump(raw)  # without comments
    for shared in SHARED:
        assert shared not in settings, f"{experiment.name} repeats {shared!r} (it belongs in base.yaml)"
    assert "tokenizer" not in raw["data"]["init_args"] and f"runs/{experiment.stem}/" not in settings
    config = printed_config(["fit", "--config", str(experiment)], capsys)
    assert config["seed_everything"] == 0 and config["weights_only"] is True
    assert config["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger")
    assert config["trainer"]["logger"]["init_args"]["name"] == "tensorboard"
    assert config["trainer"]["default_root_dir"] == f"runs/{experiment.stem}"
    assert config["checkpoint"]["save_last"] is True
    assert config["exception_checkpoint"]["class_path"] == "callbacks.faults.SafeExceptionCheckpoint"
    assert config["lr_monitor"]["logging_interval"] == "step"
    assert config["gate_monitor"]["class_path"] == "callbacks.monitors.GateMonitor"
    assert "tokenizer" not in config["data"]["init_args"]  # follows the model's (a link, not a setting)


def test_base_is_read_first_and_experiments_override_it(capsys):
    base = yaml.safe_load(BASE_CONFIG.read_text())
    assert base["gate_monitor"]["init_args"]["every_n_steps"] == 25
    config = printed_config(["fit", "--config", str(ROOT / "experiments/finetune_7b.yaml"),
                             "--checkpoint.every_n_train_steps", "7"], capsys)
    assert config["gate_monitor"]["init_args"]["every_n_steps"] == 200  # the experiment's
    assert config["checkpoint"]["every_n_train_steps"] == 7  # the flag's


def test_overrides_reach_the_data_and_the_run_folder(tmp_path, monkeypatch, sp_model, other_sp_model,
                                                     caption_shards):
    """A real tiny fit: a new model tokenizer reaches the data, a new default_root_dir moves everything."""
    monkeypatch.chdir(tmp_path)
    exp = write_experiment(tmp_path, sp_model, caption_shards)
    elsewhere = tmp_path / "elsewhere"
    cli = lightning_cli(["fit", "--config", str(exp), "--model.init_args.tokenizer", other_sp_model,
                         "--trainer.default_root_dir", str(elsewhere)])
    assert str(cli.datamodule.get_tokenizer().path) == other_sp_model
    assert cli.model.hparams.batch_size == 2  # linked from the data
    lr = cli.trainer.optimizers[0].param_groups[0]["initial_lr"]
    assert lr == pytest.approx(1.0e-3 * 2 / 256)  # blr x per-process batch x 1 process / 256
    assert cli.trainer.global_step == 2
    assert not (tmp_path / "runs").exists(), "nothing is written under the YAML's runs/exp"
    assert (elsewhere / "checkpoints" / "last.ckpt").is_file()
    assert list((elsewhere / "tensorboard").rglob("events.out.tfevents*"))
    dirs = {type(cb).__name__: str(cb.dirpath) for cb in cli.trainer.callbacks if hasattr(cb, "dirpath")}
    assert dirs == {"ModelCheckpoint": str(elsewhere / "checkpoints"),
                    "SafeExceptionCheckpoint": str(elsewhere / "checkpoints")}
    assert experiment_settings(exp, ["--trainer.default_root_dir", str(elsewhere)])["default_root_dir"] == \
        str(elsewhere)  # the SLURM script's log folder follows it too


def test_a_data_tokenizer_unlike_the_model_is_refused(tmp_path, sp_model, other_sp_model, caption_shards, capsys):
    exp = write_experiment(tmp_path, sp_model, caption_shards)
    with pytest.raises(SystemExit) as stop:
        run_lightning_cli(["fit", "--config", str(exp), "--data.init_args.tokenizer", other_sp_model])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert other_sp_model in err and sp_model in err and "model.init_args.tokenizer" in err

    # the old style: an interpolation resolved when the file is read, then the model's tokenizer changed
    old = write_experiment(tmp_path / "old", sp_model, caption_shards, tokenizer="${model.init_args.tokenizer}")
    with pytest.raises(SystemExit):
        run_lightning_cli(["fit", "--config", str(old), "--model.init_args.tokenizer", other_sp_model])
    err = capsys.readouterr().err
    assert f"{sp_model!r}" in err and f"{other_sp_model!r}" in err and str(old) in err

    # the same tokenizer written twice is accepted
    printed_config(["fit", "--config", str(old)], capsys)


def test_explicit_data_tokenizers_are_found_in_files_and_flags(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text("model: {init_args: {llm: a}}\ndata: {init_args: {tokenizer: '${model.init_args.llm}'}}\n")
    found = explicit_data_tokenizers(["--config", str(exp), "--data.init_args.tokenizer=b"])
    assert found == [("a", f"{exp} (data.init_args.tokenizer)"), ("b", "the flag --data.init_args.tokenizer")]
    assert tokenizer_conflict(found, "b", None) is None
    assert "'b'" in tokenizer_conflict(found, "a", None) and "model.init_args.llm" in tokenizer_conflict(found, "a", None)
    assert tokenizer_conflict([], "a", None) is None


def test_stage1_experiments_build_their_visual_cache(capsys):
    demo = printed_config(["fit", "--config", str(ROOT / "experiments/demo_pretrain.yaml")], capsys)["visual_cache"]
    assert demo["class_path"] == "callbacks.cache_builder.CacheBuilder"
    assert demo["init_args"]["shards"] == "data/demo/shards/train" and demo["init_args"]["out_dir"] == "data/demo/cache"
    big = printed_config(["fit", "--config", str(ROOT / "experiments/pretrain_7b.yaml")], capsys)["visual_cache"]
    assert big["init_args"]["shards"].startswith("FILL_IN:") and big["init_args"]["out_dir"] is None  # <root>/cache
    with pytest.raises(SystemExit) as stop:
        run_lightning_cli(["fit", "--config", str(ROOT / "experiments/pretrain_7b.yaml")])
    report = str(stop.value.code)
    assert "--visual_cache.init_args.shards" in report and "--model.init_args.tokenizer" in report
    assert "--data.init_args.tokenizer" not in report  # filled in from the model's: not a setting of its own


def test_an_experiments_own_callback_replaces_the_shared_one(tmp_path, monkeypatch, sp_model, caption_shards):
    monkeypatch.chdir(tmp_path)
    exp = write_experiment(tmp_path, sp_model, caption_shards)
    config = yaml.safe_load(exp.read_text())
    config["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                       "init_args": {"dirpath": str(tmp_path / "own"), "save_last": True}}]
    exp.write_text(yaml.safe_dump(config))
    cli = lightning_cli(["fit", "--config", str(exp), "--trainer.max_steps", "1", "--gate_monitor", "null",
                         "--trainer.logger", "false"])
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert names.count("ModelCheckpoint") == 1 and cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "own")
    assert "GateMonitor" not in names and "SafeExceptionCheckpoint" in names
    assert "LearningRateMonitor" not in names  # no logger to write to
