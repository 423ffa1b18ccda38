"""What the training command line derives from an experiment: shared defaults, linked settings, checks.

* ``experiments/base.yaml`` holds the settings every experiment shares (logger, checkpointing, monitors);
  :class:`ibllm.lit.ImageBindLightningCLI` reads it before the experiment file, so an experiment says only
  what is particular to it.
* :func:`link_run_arguments` makes ``trainer.default_root_dir`` the one place a run lives (logger
  folder, checkpoint folders), the model decide the data's tokenizer and the data's batch size reach
  the model.
* :func:`explicit_data_tokenizers` / :func:`tokenizer_conflict` refuse a data tokenizer set apart from the
  model's; :func:`unfilled_placeholders` finds the ``FILL_IN`` values an experiment still has.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

BASE_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "base.yaml"
PLACEHOLDER = "FILL_IN"
DATA_TOKENIZER_KEYS = ("data.init_args.tokenizer", "data.tokenizer")
# Filled in from other settings (link_run_arguments): never reported as placeholders of their own.
LINKED_KEYS = ("data.init_args.tokenizer", "model.init_args.batch_size", "checkpoint.dirpath",
               "exception_checkpoint.init_args.dirpath", "trainer.logger.init_args.save_dir")


def run_subdir(root: str | None, name: str) -> str:
    """``root/name`` (``root`` None = the working directory, as Lightning's ``default_root_dir``)."""
    return str(Path(root or ".") / name)


def checkpoint_dir(root: str | None) -> str:
    """The checkpoint folder of a run: ``<default_root_dir>/checkpoints``."""
    return run_subdir(root, "checkpoints")


def run_root(root: str | None) -> str:
    """The run folder itself (logger ``save_dir``)."""
    return str(Path(root or "."))


def model_tokenizer(llm: str | None, tokenizer: str | None) -> str | None:
    """The tokenizer a model uses: its explicit ``tokenizer`` file, else the one that comes with ``llm``."""
    return tokenizer or llm


def link_run_arguments(parser: Any) -> None:
    """Parse-time links of a LightningCLI parser that has the ``checkpoint`` / ``exception_checkpoint``
    callbacks and subclass-mode ``model`` / ``data``: run folder -> logger and checkpoints, model tokenizer
    -> data, data batch size -> model."""
    parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)
    parser.link_arguments("trainer.default_root_dir", "exception_checkpoint.init_args.dirpath",
                          compute_fn=checkpoint_dir)
    parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir", compute_fn=run_root)
    parser.link_arguments(("model.init_args.llm", "model.init_args.tokenizer"), "data.init_args.tokenizer",
                          compute_fn=model_tokenizer)
    parser.link_arguments("data.init_args.batch_size", "model.init_args.batch_size")


def _lookup(config: Any, dotted: str) -> tuple[bool, Any]:
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _yaml_value(path: str, dotted: str) -> tuple[bool, Any]:
    """``dotted`` in the YAML file ``path``, with OmegaConf interpolations resolved within that file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False, None  # the parser reports unreadable files itself
    found, value = _lookup(data, dotted)
    if found and isinstance(value, str) and "${" in value:
        from omegaconf import OmegaConf  # only for experiment files that still interpolate

        try:
            resolved = OmegaConf.to_container(OmegaConf.create(data), resolve=True)
            return _lookup(resolved, dotted)
        except Exception:  # noqa: BLE001 - an unresolvable interpolation is reported by the parser
            return True, value
    return found, value


def explicit_data_tokenizers(args: Sequence[str]) -> list[tuple[str, str]]:
    """``(value, where)`` for every data tokenizer the command line sets, in order: in a ``--config`` file
    or as a flag. The data's tokenizer follows the model's; these are checked against it."""
    found: list[tuple[str, str]] = []
    tokens = [str(t) for t in args]
    for i, token in enumerate(tokens):
        key, value = (token.split("=", 1) + [None])[:2] if token.startswith("--") else (token, None)
        if value is None and i + 1 < len(tokens):
            value = tokens[i + 1]
        if key in ("--config", "-c") and value is not None:
            for dotted in DATA_TOKENIZER_KEYS:
                present, tok = _yaml_value(value, dotted)
                if present and tok is not None:
                    found.append((str(tok), f"{value} ({dotted})"))
        elif key.removeprefix("--") in DATA_TOKENIZER_KEYS and value is not None:
            found.append((value, f"the flag {key}"))
    return found


def tokenizer_conflict(explicit: list[tuple[str, str]], llm: str | None, tokenizer: str | None) -> str | None:
    """A message when the last data tokenizer set on the command line differs from the model's, else None."""
    if not explicit:
        return None
    value, where = explicit[-1]
    model = model_tokenizer(llm, tokenizer)
    if value == model:
        return None
    source = "model.init_args.tokenizer" if tokenizer else "model.init_args.llm"
    return (f"the data would tokenize with {value!r} (set in {where}) but the model uses {model!r} ({source}); "
            "the data's tokenizer follows the model's: remove data.init_args.tokenizer, or set the model's")


def unfilled_placeholders(config: Any, path: str = "") -> list[str]:
    """Dotted keys of ``config`` (nested Namespaces / dicts / lists) whose value still starts with FILL_IN
    (keys filled in from other settings, :data:`LINKED_KEYS`, left out: their source is reported)."""
    if path in LINKED_KEYS:
        return []
    if hasattr(config, "__dict__") and not isinstance(config, (str, bytes)):
        config = vars(config)
    if isinstance(config, dict):
        return [k for key, value in config.items()
                for k in unfilled_placeholders(value, f"{path}.{key}" if path else str(key))]
    if isinstance(config, (list, tuple)):
        return [k for i, value in enumerate(config) for k in unfilled_placeholders(value, f"{path}[{i}]")]
    return [path] if isinstance(config, str) and config.startswith(PLACEHOLDER) else []
