"""Export formats: official / safetensors / merged round trips (bit-identical tensors), the CLI, atomicity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ibllm
from ibllm.checkpoints import official_adapter_keys
from ibllm.checkpoints.adapters import read_adapter
from ibllm.checkpoints.export import export
from ibllm.cli.export import main
from test_inference import VOCAB, make_tiny_project


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sp_model):
    return make_tiny_project(tmp_path_factory.mktemp("tiny_export"), sp_model, seed=3)


def _trainables(path: Path) -> dict[str, torch.Tensor]:
    """stage-1 + stage-2 tensors of our checkpoint chain, our names."""
    out = {}
    for ck in ("stage1", "stage2"):
        sd = torch.load(path.parent / f"{ck}.ckpt", weights_only=True)["state_dict"]
        out.update({k.removeprefix("model."): v for k, v in sd.items()})
    return out


def _assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_official_round_trip_is_exact(tiny, tmp_path):
    out = export(tiny["stage2"], "official", tmp_path / "7B.pth")
    raw = torch.load(out, weights_only=True)
    cfg = ibllm.load(adapter=tiny["stage2"]).model.cfg
    assert list(raw["model"]) == official_adapter_keys(cfg, "finetune")  # exact key set and order
    assert raw["config"]["ibllm"]["base_fingerprint"]
    expected = _trainables(tiny["stage2"])
    _assert_identical(read_adapter(out).state, expected)
    # official -> ours (safetensors) -> official again: same bytes per tensor
    back = export(out, "safetensors", tmp_path / "ours.safetensors")
    again = export(back, "official", tmp_path / "again.pth")
    _assert_identical(torch.load(again, weights_only=True)["model"], raw["model"])


def test_official_stage1_layout(tiny, tmp_path):
    out = export(tiny["stage1"], "official", tmp_path / "7B-pretrained.pth")
    raw = torch.load(out, weights_only=True)["model"]
    cfg = ibllm.load(adapter=tiny["stage1"]).model.cfg
    assert list(raw) == official_adapter_keys(cfg, "pretrain")
    # stage-2 file exported as stage 1: only the stage-1 tensors
    out2 = export(tiny["stage2"], "official", tmp_path / "s1.pth", stage="pretrain")
    _assert_identical(torch.load(out2, weights_only=True)["model"], raw)


def test_safetensors_round_trip_and_config(tiny, tmp_path):
    out = export(tiny["stage2"], "safetensors", tmp_path / "adapter.safetensors")
    _assert_identical(load_file(out), _trainables(tiny["stage2"]))
    meta = read_adapter(out).meta
    assert meta["stage"] == "finetune" and meta["base_fingerprint"] and meta["llama_config"]["dim"] == 64
    assert (tmp_path / "adapter.json").is_file()
    model = ibllm.load(adapter=out)  # base, encoder and tokenizer from the recorded config
    ref = ibllm.load(adapter=tiny["stage2"])
    tokens = torch.randint(3, VOCAB, (1, 7))
    with torch.no_grad():
        assert torch.equal(model.model(tokens, feature=torch.randn(1, 32, generator=torch.Generator().manual_seed(0))),
                           ref.model(tokens, feature=torch.randn(1, 32, generator=torch.Generator().manual_seed(0))))


def test_merged_logits_equal_unmerged(tiny, tmp_path):
    out = export(tiny["stage2"], "merged", tmp_path / "merged")
    assert {p.name for p in out.iterdir()} >= {"params.json", "consolidated.00.pth", "extra.safetensors",
                                                "ibllm.json", "README.md", "tokenizer.model"}
    merged = ibllm.load(adapter=out)
    ref = ibllm.load(adapter=tiny["stage2"])
    tokens = torch.randint(3, VOCAB, (2, 13))
    visual = ref.visual({"image": [str(tiny["image"])] * 2})
    with torch.no_grad():
        torch.testing.assert_close(merged.model(tokens, visual=visual), ref.model(tokens, visual=visual),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged.model(tokens), ref.model(tokens), atol=1e-5, rtol=1e-5)
    # the non-Meta tensors round-trip exactly
    extra = load_file(out / "extra.safetensors")
    own = ref.model.state_dict()
    for k in ("image_bind_proj.weight", "prefix_query.weight", "llama.layers.1.attention.gate"):
        assert torch.equal(extra[k], own[k])
    assert torch.equal(extra["llama.layers.0.attention.wq.bias"], own["llama.layers.0.attention.wq.base_layer.bias"])
    assert torch.equal(extra["llama.layers.0.attention.wv_visual.weight"],
                       own["llama.layers.0.attention.wv.base_layer.weight"])
    assert merged.generate({"image": [str(tiny["image"])]}, ["red"], max_gen_len=6, temperature=0) == \
        ref.generate({"image": [str(tiny["image"])]}, ["red"], max_gen_len=6, temperature=0)


def test_exports_are_atomic(tiny, tmp_path, monkeypatch):
    import ibllm.checkpoints.io as ck

    target = tmp_path / "a.pth"
    target.write_bytes(b"previous")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        export(tiny["stage2"], "official", target, force=True)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]  # no temp files left behind
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(ck.torch, "save", boom)
        export(tiny["stage2"], "merged", tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]


@pytest.mark.system  # ends with the command line as a subprocess
def test_cli_export_and_errors(tiny, tmp_path, capsys, run_ibllm):
    main([str(tiny["stage2"]), "--format", "safetensors", str(tmp_path / "x.safetensors")])
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tiny["stage2"]), "--format", "safetensors", str(tmp_path / "x.safetensors")])
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.ckpt"), "--format", "official", str(tmp_path / "y.pth")])
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing.ckpt" in err and err.count("\n") == 1
    proc = run_ibllm(["export", tiny["stage1"], "--format", "official", tmp_path / "s1.pth"], timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_stage2_without_stage1_needs_init_from(tiny, tmp_path):
    raw = torch.load(tiny["stage2"], weights_only=True)
    raw["hyper_parameters"]["init_from"] = None
    torch.save(raw, tmp_path / "orphan.ckpt")
    with pytest.raises(ValueError, match="--init-from"):
        export(tmp_path / "orphan.ckpt", "official", tmp_path / "o.pth")
    out = export(tmp_path / "orphan.ckpt", "official", tmp_path / "o.pth", init_from=str(tiny["stage1"]))
    _assert_identical(read_adapter(out).state, _trainables(tiny["stage2"]))
