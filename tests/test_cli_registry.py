"""The verb registry: every verb's parser comes from its typed function, keeps the flags users have typed
(kebab-case, bare booleans, ``--no-X``, aliases, positionals, sub-actions), takes ``--config FILE.yaml``, and
reports a bad option or config file as one line naming the file and key."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import ibllm
from ibllm.cli import VERBS
from ibllm.verbs.registry import REGISTRY, build_parser, parse, run, sub_actions

REPO = Path(__file__).resolve().parents[1]
VERB_MODULES = [module for module, _ in VERBS.values()] + ["ibllm.server.cli", "ibllm.slurm"]


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    """Import every verb module (each registers its verbs)."""
    for module in VERB_MODULES:
        importlib.import_module(module)


def error_line(capsys, name: str, argv: list[str]) -> str:
    """Run verb ``name`` expecting a command-line error; returns its one stderr line."""
    with pytest.raises(SystemExit) as e:
        run(name, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def test_every_verb_has_a_registered_function_and_help(capsys):
    names = set(REGISTRY)
    for verb in VERBS:
        assert verb in names or sub_actions(verb), verb
    for name in names:
        parser = build_parser(name)
        assert parser.prog.startswith("python -m ibllm")
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["--help"])
        assert e.value.code == 0
        fn = REGISTRY[name].function
        doc = inspect.getdoc(fn) or ""
        assert doc.split("\n")[0], f"{name}: no docstring"
        out = capsys.readouterr().out
        for param in inspect.signature(fn).parameters:  # every option has help text from the docstring
            assert f"{param}:" in doc or param == "argv", f"{name}: parameter {param} undocumented"
        assert "--" in out


@pytest.mark.parametrize("name, argv, expected", [
    ("chat", ["--adapter", "a.ckpt", "--llm", "x", "--imagebind-preset", "demo", "--no-check-base", "--merge",
              "--image", "i.jpg", "--max-gen-len", "5", "--top-p=0.5"],
     {"model.adapter": "a.ckpt", "model.llama": "x", "model.imagebind_preset": "demo", "model.check_base": False,
      "model.merge": True, "inputs.image": "i.jpg", "sampling.max_gen_len": 5, "sampling.top_p": 0.5}),
    ("generate", ["--prompt", "Answer: yes", "--prompt", "b", "--raw", "--json", "--prompts-file", "-"],
     {"prompt": ["Answer: yes", "b"], "raw": True, "json": True, "prompts_file": "-"}),
    ("export", ["c.ckpt", "--format", "merged", "out", "--init-from", "s1.pth", "--no-check-base", "--force"],
     {"ckpt": "c.ckpt", "out": "out", "format": "merged", "init_from": "s1.pth", "check_base": False, "force": True}),
    ("consolidate", ["dir", "--out", "f.pth", "--format", "safetensors"],
     {"ckpt": "dir", "out": "f.pth", "format": "safetensors"}),
    ("score mme", ["results"], {"results": "results"}),
    ("evaluate", ["--task", "vqa", "--data", "d", "--llama", "tiny", "--no-template", "--bgr", "--restart",
                  "--devices", "2", "--max-new-tokens", "4"],
     {"task": "vqa", "llm": "tiny", "template": False, "bgr": True, "restart": True, "devices": "2",
      "max_new_tokens": 4}),
    ("features", ["--shards", "s", "--out", "o", "--imagebind-weights", "w", "--no-progress", "--overwrite"],
     {"imagebind_weights": "w", "progress": False, "overwrite": True}),
    ("cache", ["--shards", "s", "--out", "o", "--memory-budget", "8G", "--clean-parts", "--index-type", "flat"],
     {"memory_budget": "8G", "clean_parts": True, "index_type": "flat"}),
    ("demo prepare", ["--stage0-steps", "3", "--root", "r"], {"stage0_steps": 3, "root": "r"}),
    ("easyvqa prepare", ["--stage0-steps", "3", "--quiet", "--balance-yes-no", "--seed", "2"],
     {"recipe.steps": 3, "recipe.seed": 2, "quiet": True, "balance_yes_no": True}),
    ("easyvqa evaluate", ["--llm", "tiny", "--limit", "12", "--checkpoint", "c", "--restart", "--temperature", "0"],
     {"checkpoint": "c", "extra": ["--llm", "tiny", "--limit", "12", "--restart", "--temperature", "0"]}),
    ("bind", ["--out", "e.pt", "--config", "tiny", "--steps", "2", "--batch-size", "8", "--no-augment", "--fp32",
              "--eval-every", "1"],
     {"out": "e.pt", "recipe.cfg": "tiny", "recipe.steps": 2, "recipe.batch_size": 8, "recipe.augment": False,
      "recipe.bf16": False, "eval_every": 1}),
    ("crossmodal", ["--inputs", "image", "--cache-k", "3", "--json", "r.json", "--quiet"],
     {"inputs": "image", "cache_k": 3, "json": "r.json", "quiet": True}),
    ("serve", ["--adapter", "a", "--port", "1234", "--host", "0.0.0.0"],
     {"model.adapter": "a", "port": 1234, "sampling.max_gen_len": 128}),
    ("serve --api", ["--adapter", "a", "--api-key", "k", "--max-batch", "1", "--media-dir", "m"],
     {"http.api_key": "k", "http.max_batch": 1, "http.media_dir": "m", "sampling.max_gen_len": 128}),
    ("slurm", ["--config", "e.yaml", "--gpus-per-node", "2", "--prepare-demo", "--dry-run", "--args", "--a.b 1"],
     {"config": "e.yaml", "gpus_per_node": 2, "prepare_demo": True, "dry_run": True, "args": "--a.b 1"}),
    ("inspect", ["--preset", "7B", "--stage", "finetune", "--json"],
     {"preset": "7B", "stage": "finetune", "json": True}),
])
def test_the_flags_users_type_still_parse(name, argv, expected):
    values = parse(name, argv)
    for key, want in expected.items():
        group, _, field = key.partition(".")
        got = getattr(values[group], field) if field else values[group]
        assert got == want, (key, got)


def test_stage0_recipes_are_yaml(tmp_path):
    from ibllm.demos.digits.towers import DemoRecipe
    from ibllm.demos.easyvqa.towers import EasyVQARecipe

    digits = parse("bind", ["--config", str(REPO / "experiments/stage0_digits.yaml")])
    assert digits["recipe"] == DemoRecipe() and digits["out"] == "data/demo/encoder.safetensors"  # demo prepare's
    easy = parse("easyvqa prepare", ["--config", str(REPO / "experiments/stage0_easyvqa.yaml")])
    assert easy["recipe"] == EasyVQARecipe() and easy["root"] == "data/easyvqa"
    # later options override the file; a file given with --config=... reads the same
    steps = parse("bind", [f"--config={REPO / 'experiments/stage0_digits.yaml'}", "--steps", "7", "--cfg", "tiny"])
    assert dataclasses.replace(DemoRecipe(), steps=7, cfg="tiny") == steps["recipe"]


def test_bad_values_are_one_line_naming_the_option(capsys):
    line = error_line(capsys, "chat", ["--max-gen-len", "many"])
    assert line == "python -m ibllm chat: error: --max-gen-len: expected int, got 'many'"
    line = error_line(capsys, "export", ["a", "--format", "zip", "b"])
    assert line.startswith("python -m ibllm export: error: --format: expected one of 'official'") and "'zip'" in line
    assert error_line(capsys, "consolidate", []).endswith("missing CKPT, --out (required)")
    assert error_line(capsys, "generate", ["--bogus", "1"]).endswith("unrecognized arguments: --bogus 1")
    assert "expected an action, one of: prepare, evaluate" in error_line(capsys, "easyvqa", ["prepar"])


def test_bad_config_files_name_the_file_and_key(tmp_path, capsys):
    bad_value = tmp_path / "value.yaml"
    bad_value.write_text("out: x.pt\nsteps: lots\n")
    line = error_line(capsys, "bind", ["--config", str(bad_value)])
    assert line == f"python -m ibllm bind: error: {bad_value}: key 'steps': expected int, got 'lots'"
    # a bad value on the command line is the command line's fault, even when a file sets the same key
    good = tmp_path / "good.yaml"
    good.write_text("out: x.pt\nsteps: 3\n")
    assert error_line(capsys, "bind", ["--config", str(good), "--steps", "x"]) == \
        "python -m ibllm bind: error: --steps: expected int, got 'x'"
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("out: x.pt\nstepz: 3\n")
    assert f"{unknown}: key 'stepz' is not an option of python -m ibllm bind" in error_line(
        capsys, "bind", ["--config", str(unknown)])
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("out: x.pt\nsteps: [1, 2\nlr: 0.1\n")
    line = error_line(capsys, "bind", ["--config", str(syntax)])
    assert line.startswith(f"python -m ibllm bind: error: {syntax}, line 3, column 3: ") and "unicode" not in line
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    assert "expected a mapping of option names to values" in error_line(capsys, "chat", ["--config", str(listed)])
    assert error_line(capsys, "chat", ["--config", str(tmp_path / "none.yaml")]).endswith(
        f"--config {tmp_path / 'none.yaml'}: no such file")


def test_ibllm_load_shows_the_real_signature_without_importing_torch():
    code = ("import sys, inspect, ibllm; sig = str(inspect.signature(ibllm.load)); doc = ibllm.load.__doc__;"
            "print('torch' in sys.modules); import ibllm.api as api;"
            "print(sig == str(inspect.signature(api.load)), doc == api.load.__doc__, sig)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout.splitlines()
    assert out[0] == "False"
    assert out[1].startswith("True True (adapter: ") and "check_base: 'bool' = True" in out[1]
    assert ibllm.load.__name__ == "load" and "Load an ImageBind-LLM" in ibllm.load.__doc__


@pytest.mark.system
def test_module_errors_show_the_command_not_main(tmp_path):
    bad = tmp_path / "exp.yaml"
    bad.write_text("adapter: a\nmax_gen_len: [\n")
    proc = subprocess.run([sys.executable, "-m", "ibllm", "chat", "--config", str(bad)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"python -m ibllm chat: error: {bad}, line 3") and proc.stderr.count("\n") == 1


def test_lightning_verbs_report_bad_options_and_yaml_in_one_line(tmp_path, capsys, monkeypatch):
    from ibllm.lit import run_lightning_cli

    monkeypatch.setattr(sys, "argv", ["python -m ibllm"])  # LightningCLI reads sys.argv too

    experiment = str(REPO / "experiments/demo_pretrain.yaml")

    def first_line(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as e:
            run_lightning_cli(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err.strip()

    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("trainer:\n  max_steps: 3\n  devices: [1\n")
    assert first_line(["fit", "--config", str(syntax)]).startswith(
        f"python -m ibllm fit: error: {syntax}, line 4, column 1: ")
    value = tmp_path / "value.yaml"
    value.write_text("model:\n  class_path: ibllm.lit.ImageBindLLMModule\n  init_args:\n    lr: fast\n")
    assert first_line(["fit", "--config", experiment, "--config", str(value)]) == \
        f"python -m ibllm fit: error: {value}: key 'model.init_args.lr': expected float, got 'fast'"
    assert first_line(["fit", "--config", experiment, "--trainer.max_steps", "x"]) == \
        "python -m ibllm fit: error: --trainer.max_steps: expected int, got 'x'"
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trainer:\n  max_stepz: 3\n")
    assert first_line(["fit", "--config", experiment, "--config", str(unknown)]) == \
        f"python -m ibllm fit: error: {unknown}: key 'trainer.max_stepz': no such option"
