"""Meta-device construction: the recorded initialisation replays to the one-process values, the lazy base
readers give the eager readers' tensors, and an FSDP2 model built on the meta device over 2 gloo processes
(subprocesses running tests/dist_meta_init.py) equals the one-process model: every tensor after
initialisation, the logits of a fixed batch, and the trainable tensors after one step."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ibllm.build import build_model, build_model_on_meta, finish_on_meta
from ibllm.checkpoints.hf import save_hf_llama
from ibllm.checkpoints.io import llama_shapes
from ibllm.checkpoints.lazy import open_llama
from ibllm.checkpoints.llama import load_llama
from ibllm.checkpoints.meta import save_meta_llama
from ibllm.config import llama_preset
from ibllm.meta_init import InitRecord

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "dist_meta_init.py"


def write_base(tmp: Path, fmt: str, num_shards: int = 1) -> Path:
    """A random tiny LLaMA (fp16 values) in Meta or Hugging Face layout."""
    cfg = llama_preset("tiny", visual_dim=32)
    g = torch.Generator().manual_seed(5)
    sd = {k: torch.randn(s, generator=g).half() for k, s in llama_shapes(cfg).items()}
    out = tmp / f"{fmt}{num_shards}"
    if fmt == "meta":
        save_meta_llama(cfg, sd, out, num_shards=num_shards)
    else:
        save_hf_llama(cfg, {k: v.float() for k, v in sd.items()}, out)
    return out


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@pytest.mark.parametrize("source", ["preset", "meta1", "meta2", "hf"])
def test_meta_build_equals_eager_build(tmp_path, stage, source):
    llm = "tiny" if source == "preset" else str(write_base(tmp_path, source[:-1] if source != "hf" else "hf",
                                                            int(source[-1]) if source != "hf" else 1))
    eager = build_model(llm, stage, "tiny", None, ["vision"], seed=3)
    rng = torch.get_rng_state()
    model, deferred = build_model_on_meta(llm, stage, "tiny", None, ["vision"], seed=3)
    assert all(p.is_meta for p in model.llama.parameters()) and not any(p.is_meta for p in model.image_bind.parameters())
    finish_on_meta(model, deferred)
    assert torch.equal(torch.get_rng_state(), rng)  # the generator ends where the eager build leaves it
    want, got = eager.state_dict(), model.state_dict()
    assert set(want) == set(got)
    assert not [k for k in want if not torch.equal(want[k], got[k])]


@pytest.mark.parametrize("fmt,num_shards", [("meta", 1), ("meta", 2), ("hf", 1)])
def test_lazy_readers_match_eager_readers(tmp_path, fmt, num_shards):
    path = write_base(tmp_path, fmt, num_shards)
    cfg, eager = load_llama(path)
    lazy_cfg, lazy = open_llama(path)
    assert lazy_cfg == cfg and set(lazy) == set(eager)
    for key in eager:
        assert lazy.shapes[key] == tuple(eager[key].shape)
        assert torch.equal(lazy[key].float(), eager[key])


def test_replay_refuses_what_it_cannot_reproduce():
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.empty(4, 4))
            nn.init.normal_(self.w[:2])  # a view: the rest stays uninitialised

    with pytest.raises(NotImplementedError, match="view"):
        with torch.device("meta"), InitRecord():
            Partial()


# ---- 2 gloo processes ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_runner(cli_env, out: Path, *args: str, world: int = 1) -> dict:
    """tests/dist_meta_init.py on ``world`` processes (1: no process group); returns what rank 0 saved."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = cli_env()
        if world > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                       WORLD_SIZE=str(world))
        procs.append(subprocess.Popen([sys.executable, str(RUNNER), "--out", str(out), *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-6000:]
    return torch.load(out, weights_only=False)


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.system
@pytest.mark.parametrize("stage,frozen_dtype", [("pretrain", "float32"), ("finetune", "bfloat16")])
def test_fsdp2_meta_build_equals_one_process(tmp_path, cli_env, stage, frozen_dtype):
    base = str(write_base(tmp_path, "meta"))
    common = ("--llm", base, "--stage", stage, "--frozen-dtype", frozen_dtype)
    single = run_runner(cli_env, tmp_path / "single.pt", *common)
    sharded = run_runner(cli_env, tmp_path / "meta.pt", *common, world=2)
    assert "llama.layers.0.attention.wq.weight" in sharded["sharded"] or \
        "llama.layers.0.attention.wq.base_layer.weight" in sharded["sharded"]
    assert max_diff(single["init"], sharded["init"]) == 0.0  # every tensor, trainable or frozen
    assert torch.equal(single["rng_after_init"], sharded["rng_after_init"])
    assert single["fingerprint"] == sharded["fingerprint"] is not None
    assert float((single["logits"] - sharded["logits"]).abs().max()) < 1e-5
    assert max_diff(single["stepped"], sharded["stepped"]) < 1e-6
    assert max_diff(single["stepped"], {k: single["init"][k] for k in single["stepped"]}) > 1e-4  # it trained
