"""Checkpoint import/export: Meta, Hugging Face, GGUF, official adapters, safe loading and clear errors."""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ibllm.checkpoints import (
    CheckpointError, check_state_dict, export_official_adapter, find_tokenizer, hf_to_meta_qk, llama_shapes,
    load_gguf_llama, load_hf_llama, load_llama, load_meta_llama, load_official_adapter, meta_to_hf_qk,
    official_adapter_keys, official_adapter_shapes, official_to_ours, ours_to_official, safe_load, save_atomic,
    save_hf_llama, save_meta_llama,
)
from ibllm.config import LLaMAConfig, llama_preset


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


ARCH = ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "hidden_dim", "norm_eps", "rope_theta",
        "tie_embeddings")


def arch(cfg: LLaMAConfig) -> tuple:
    """The fields a weight file determines (max_seq_len, lora_rank, visual_dim are the wrapper's)."""
    return tuple(getattr(cfg, f) for f in ARCH)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def tiny() -> LLaMAConfig:
    return llama_preset("tiny")


@pytest.fixture
def tiny_sd(tiny: LLaMAConfig) -> dict[str, torch.Tensor]:
    return random_state(llama_shapes(tiny))


# ------------------------------------------------------------------------------------------------ Meta


def test_meta_round_trip(tmp_path, tiny, tiny_sd):
    save_meta_llama(tiny, tiny_sd, tmp_path / "tiny")
    cfg, sd = load_meta_llama(tmp_path / "tiny")
    assert arch(cfg) == arch(tiny) and cfg.name == "tiny"
    assert_same(sd, tiny_sd)
    params = json.loads((tmp_path / "tiny" / "params.json").read_text())
    assert params["n_kv_heads"] == 2 and "rope.freqs" not in sd


def test_meta_fp16_cast_and_vocab_minus_one(tmp_path, tiny, tiny_sd):
    d = tmp_path / "7B"
    half = {k: v.half() for k, v in tiny_sd.items()}
    save_meta_llama(tiny, half, d)
    params = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    (tmp_path / "tokenizer.model").write_bytes(b"stub")  # Meta layout: one tokenizer beside the size folders
    cfg, sd = load_meta_llama(d, dtype=torch.float32)
    assert cfg.vocab_size == tiny.vocab_size
    assert_same(sd, {k: v.float() for k, v in half.items()})
    assert find_tokenizer(d) == tmp_path / "tokenizer.model"


def split_model_parallel(sd: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Split like Meta's model-parallel files, written independently of the code under test."""
    col = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")  # rows split
    row = ("wo.weight", "w2.weight", "tok_embeddings.weight")  # columns split
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for k, v in sd.items():
        for i in range(n):
            if k.endswith(col):
                shards[i][k] = v[i * v.shape[0] // n:(i + 1) * v.shape[0] // n].clone()
            elif k.endswith(row):
                shards[i][k] = v[:, i * v.shape[1] // n:(i + 1) * v.shape[1] // n].clone()
            else:
                shards[i][k] = v.clone()
    for s in shards:
        s["rope.freqs"] = torch.ones(8)
    return shards


def test_meta_two_shard_merge(tmp_path, tiny, tiny_sd):
    d = tmp_path / "13B"
    d.mkdir()
    for i, shard in enumerate(split_model_parallel(tiny_sd, 2)):
        torch.save(shard, d / f"consolidated.{i:02d}.pth")
    (d / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                               "vocab_size": -1, "multiple_of": 32, "norm_eps": 1e-6}))
    cfg, sd = load_meta_llama(d)
    assert_same(sd, tiny_sd)
    assert cfg.hidden_dim == tiny.hidden_dim and cfg.vocab_size == 512
    # our own writer produces the same split
    save_meta_llama(tiny, tiny_sd, tmp_path / "ours", num_shards=2)
    mine = safe_load(tmp_path / "ours" / "consolidated.01.pth")
    theirs = torch.load(d / "consolidated.01.pth", weights_only=True)
    assert all(torch.equal(mine[k], theirs[k]) for k in tiny_sd)
    assert_same(load_meta_llama(tmp_path / "ours")[1], tiny_sd)


def test_meta_errors_name_file_key_and_shapes(tmp_path, tiny, tiny_sd):
    d = tmp_path / "m"
    save_meta_llama(tiny, tiny_sd, d)
    sd = safe_load(d / "consolidated.00.pth")
    sd["layers.1.attention.wk.weight"] = torch.zeros(64, 64)
    save_atomic(sd, d / "consolidated.00.pth")  # never overwrite a memory-mapped file in place
    with pytest.raises(CheckpointError) as e:
        load_meta_llama(d)
    msg = str(e.value)
    assert str(d) in msg and "layers.1.attention.wk.weight" in msg and "[64, 64]" in msg and "[32, 64]" in msg
    del sd["layers.1.attention.wk.weight"]
    save_atomic(sd, d / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"missing key.*layers\.1\.attention\.wk\.weight"):
        load_meta_llama(d)
    with pytest.raises(CheckpointError, match="params.json"):
        load_meta_llama(tmp_path / "nothing-here")


# ------------------------------------------------------------------------------------------------ HF


def rope_interleaved(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Meta RoPE on [S, H, hd]: adjacent pairs (2i, 2i+1) are the real and imaginary parts of one complex number."""
    s, hd = x.shape[0], x.shape[-1]
    ang = torch.outer(torch.arange(s).double(), 1.0 / theta ** (torch.arange(0, hd, 2).double() / hd))
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], hd // 2, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)[:, None]).flatten(-2)


def rope_rotate_half(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """HF RoPE on [S, H, hd]: element i pairs with i + hd/2."""
    s, hd = x.shape[0], x.shape[-1]
    ang = torch.outer(torch.arange(s).double(), 1.0 / theta ** (torch.arange(0, hd, 2).double() / hd))
    ang = torch.cat([ang, ang], -1)[:, None]
    x = x.double()
    return x * ang.cos() + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * ang.sin()


def scores(wq, wk, x, n_heads, n_kv, rope):
    s, hd = x.shape[0], wq.shape[0] // n_heads
    q = rope((x @ wq.T).view(s, n_heads, hd))
    k = rope((x @ wk.T).view(s, n_kv, hd)).repeat_interleave(n_heads // n_kv, dim=1)
    return torch.einsum("qhd,khd->hqk", q, k)


def test_rotate_half_conversion_gives_same_attention_scores():
    g = torch.Generator().manual_seed(1)
    n_heads, n_kv, hd, d = 4, 2, 16, 64
    wq, wk = torch.randn(n_heads * hd, d, generator=g), torch.randn(n_kv * hd, d, generator=g)
    x = torch.randn(7, d, generator=g)
    ref = scores(wq, wk, x, n_heads, n_kv, rope_interleaved)
    hf = scores(meta_to_hf_qk(wq, n_heads), meta_to_hf_qk(wk, n_kv), x, n_heads, n_kv, rope_rotate_half)
    torch.testing.assert_close(hf, ref)
    wrong = scores(wq, wk, x, n_heads, n_kv, rope_rotate_half)
    assert not torch.allclose(wrong, ref, atol=1e-3)
    assert torch.equal(hf_to_meta_qk(meta_to_hf_qk(wk, n_kv), n_kv), wk)


def test_hf_round_trip_and_layout(tmp_path, tiny, tiny_sd):
    save_hf_llama(tiny, tiny_sd, tmp_path / "hf")
    raw = safe_load(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(raw["model.layers.0.self_attn.k_proj.weight"],
                       meta_to_hf_qk(tiny_sd["layers.0.attention.wk.weight"], tiny.kv_heads))
    assert torch.equal(raw["model.layers.1.mlp.gate_proj.weight"], tiny_sd["layers.1.feed_forward.w1.weight"])
    cfg, sd = load_hf_llama(tmp_path / "hf")
    assert_same(sd, tiny_sd)
    assert arch(cfg) == arch(tiny)
    assert load_llama(tmp_path / "hf")[0] == cfg


def test_hf_tied_sharded_and_bin(tmp_path, tiny, tiny_sd):
    cfg = dataclasses.replace(tiny, tie_embeddings=True, rope_theta=5e5)
    tied = dict(tiny_sd, **{"output.weight": tiny_sd["tok_embeddings.weight"]})
    save_hf_llama(cfg, tied, tmp_path / "hf")
    raw = safe_load(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" not in raw
    got_cfg, sd = load_hf_llama(tmp_path / "hf")
    assert got_cfg.tie_embeddings and got_cfg.rope_theta == 5e5
    assert sd["output.weight"] is sd["tok_embeddings.weight"]
    assert_same(sd, tied)
    # split into two safetensors files with an index, and a .bin copy
    names = sorted(raw)
    parts = [{k: raw[k] for k in names[::2]}, {k: raw[k] for k in names[1::2]}]
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_atomic(part, sharded / fname)
        weight_map.update({k: fname for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same(load_hf_llama(sharded)[1], tied)
    binned = tmp_path / "bin"
    binned.mkdir()
    (binned / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(raw, binned / "pytorch_model.bin")
    assert_same(load_hf_llama(binned)[1], tied)


def test_hf_errors(tmp_path, tiny, tiny_sd):
    save_hf_llama(tiny, tiny_sd, tmp_path / "hf")
    raw = safe_load(tmp_path / "hf" / "model.safetensors")
    save_atomic(dict(raw, **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
                tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected key 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load_hf_llama(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(CheckpointError, match="gpt_neox"):
        load_hf_llama(tmp_path / "hf")


# ------------------------------------------------------------------------------------------------ GGUF


def write_tiny_gguf(path: Path, cfg: LLaMAConfig, sd: dict[str, torch.Tensor], q8: tuple[str, ...] = (),
                    tied: bool = False, arch: str = "llama") -> None:
    """A tiny llama GGUF: Meta-layout tensors under llama.cpp names, some Q8_0, gpt2 tokenizer metadata."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    tokens = ["<|endoftext|>"] + [f"t{i}" for i in range(cfg.vocab_size - 1)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (cfg.vocab_size - 1))
    w.add_token_merges(["t 1"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    names = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "output.weight": "output.weight"}
    layer = {"attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
             "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
             "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
             "feed_forward.w3.weight": "ffn_up.weight", "attention_norm.weight": "attn_norm.weight",
             "ffn_norm.weight": "ffn_norm.weight"}
    for k, v in sd.items():
        if tied and k == "output.weight":
            continue
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            name = f"blk.{i}.{layer[rest]}"
        else:
            name = names[k]
        arr = v.numpy().astype(np.float32)
        if k in q8:
            w.add_tensor(name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_tiny_f32_and_q8(tmp_path, tiny, tiny_sd):
    import gguf

    q8 = ("layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight", "tok_embeddings.weight")
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny, tiny_sd, q8=q8, tied=True)
    cfg, sd = load_gguf_llama(tmp_path / "tiny.gguf")
    assert cfg.tie_embeddings and sd["output.weight"] is sd["tok_embeddings.weight"]
    assert arch(cfg) == arch(dataclasses.replace(tiny, tie_embeddings=True))
    for k, v in tiny_sd.items():
        if k == "output.weight":
            continue
        assert sd[k].shape == v.shape, k
        if k in q8:
            expect = gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                            gguf.GGMLQuantizationType.Q8_0)
            assert torch.equal(sd[k], torch.from_numpy(expect)), k
            torch.testing.assert_close(sd[k], v, atol=0.05, rtol=0.02)
        else:
            assert torch.equal(sd[k], v), k
    assert load_llama(tmp_path / "tiny.gguf")[0] == cfg
    bf16 = load_gguf_llama(tmp_path / "tiny.gguf", dtype=torch.bfloat16)[1]
    assert bf16["norm.weight"].dtype == torch.bfloat16


def test_gguf_untied_and_wrong_arch(tmp_path, tiny, tiny_sd):
    write_tiny_gguf(tmp_path / "untied.gguf", tiny, tiny_sd)
    cfg, sd = load_gguf_llama(tmp_path / "untied.gguf")
    assert not cfg.tie_embeddings
    assert_same(sd, tiny_sd)
    write_tiny_gguf(tmp_path / "other.gguf", tiny, tiny_sd, arch="qwen2")
    with pytest.raises(CheckpointError, match=r"other\.gguf.*'qwen2'"):
        load_gguf_llama(tmp_path / "other.gguf")
    with pytest.raises(CheckpointError, match="not found"):
        load_gguf_llama(tmp_path / "absent.gguf")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> tuple[LLaMAConfig, dict[str, torch.Tensor]]:
    return load_gguf_llama(smollm2_gguf)


def test_real_smollm2_gguf_header_matches_preset(smollm2):
    cfg, sd = smollm2
    preset = llama_preset("smollm2-135m")
    assert dataclasses.replace(cfg, name=preset.name) == preset
    w = sd["layers.3.feed_forward.w2.weight"]  # Q4_1 in the file
    assert w.shape == (576, 1536) and w.dtype == torch.float32 and torch.isfinite(w).all() and w.std() > 0
    assert sd["layers.0.attention.wk.weight"].shape == (192, 576)
    assert sd["output.weight"] is sd["tok_embeddings.weight"]


def reference_nll(cfg: LLaMAConfig, sd: dict[str, torch.Tensor], ids: torch.Tensor, rope) -> float:
    """Mean next-token NLL of a plain LLaMA forward (independent of ibllm.models) with a given RoPE."""
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    x = sd["tok_embeddings.weight"][ids]
    s, h, kv, hd = len(ids), cfg.n_heads, cfg.kv_heads, cfg.head_dim
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        a = rms(x, sd[p + "attention_norm.weight"])
        q = rope((a @ sd[p + "attention.wq.weight"].T).view(s, h, hd), cfg.rope_theta).float()
        k = rope((a @ sd[p + "attention.wk.weight"].T).view(s, kv, hd), cfg.rope_theta).float()
        v = (a @ sd[p + "attention.wv.weight"].T).view(s, kv, hd)
        k, v = k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        x = x + o.transpose(0, 1).reshape(s, -1) @ sd[p + "attention.wo.weight"].T
        f = rms(x, sd[p + "ffn_norm.weight"])
        x = x + (F.silu(f @ sd[p + "feed_forward.w1.weight"].T) * (f @ sd[p + "feed_forward.w3.weight"].T)) \
            @ sd[p + "feed_forward.w2.weight"].T
    logits = rms(x, sd["norm.weight"]) @ sd["output.weight"].T
    return F.cross_entropy(logits[:-1], ids[1:]).item()


def test_real_smollm2_qk_are_meta_interleaved(smollm2, smollm2_gguf):
    """GGUF q/k rows are in Meta's interleaved layout: interleaved RoPE models real text far better."""
    from ibllm.tokenizer import tokenizer_from_gguf

    cfg, sd = smollm2
    tok = tokenizer_from_gguf(smollm2_gguf)
    text = ("Paris is the capital and most populous city of France. It is located on the Seine river, in the "
            "north of the country. The city is known for its museums and architecture.")
    ids = torch.tensor(tok.encode(text, bos=False))
    with torch.no_grad():
        good = reference_nll(cfg, sd, ids, rope_interleaved)
        wrong = reference_nll(cfg, sd, ids, rope_rotate_half)
    assert good < 2.5 and wrong > good + 0.5, (good, wrong)


# ------------------------------------------------------------------------------------------------ official adapter


class _Attention(nn.Module):
    def __init__(self, d: int, kv: int, h: int) -> None:
        super().__init__()
        self.wq, self.wk = nn.Linear(d, d, bias=True), nn.Linear(d, kv, bias=False)
        self.wv, self.wo = nn.Linear(d, kv, bias=False), nn.Linear(d, d, bias=True)
        self.gate = nn.Parameter(torch.zeros(1, h, 1, 1))


class _FFN(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(d, f), nn.Linear(f, d), nn.Linear(d, f)


class _Layer(nn.Module):
    def __init__(self, cfg: LLaMAConfig) -> None:
        super().__init__()
        self.attention = _Attention(cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.n_heads)
        self.feed_forward = _FFN(cfg.dim, cfg.hidden_dim)
        self.attention_norm, self.ffn_norm = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)


class _Llama(nn.Module):
    def __init__(self, cfg: LLaMAConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.n_layers))
        self.norm, self.output = nn.RMSNorm(cfg.dim), nn.Linear(cfg.dim, cfg.vocab_size, bias=False)


class _Model(nn.Module):
    """Same attribute paths as ImageBindLLM (bind network, prefix, llama; encoder stand-in)."""

    def __init__(self, cfg: LLaMAConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.image_bind = nn.Linear(4, 4)
        self.image_bind_proj = nn.Linear(cfg.visual_dim, d)
        for k in (1, 2, 3):
            setattr(self, f"image_bind_norm_{k}", nn.RMSNorm(d))
            setattr(self, f"image_bind_f1_{k}", nn.Linear(d, 4 * d, bias=False))
            setattr(self, f"image_bind_f2_{k}", nn.Linear(4 * d, d, bias=False))
            setattr(self, f"image_bind_f3_{k}", nn.Linear(d, 4 * d, bias=False))
        self.llama = _Llama(cfg)
        self.prefix_query = nn.Embedding(cfg.n_layers, d)


def peft_model(cfg: LLaMAConfig) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = _Model(cfg)
    targets = [f"llama.layers.{i}.{m}" for i in range(cfg.n_layers)
               for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                         "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")]
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, lora_dropout=0.0, target_modules=targets)
    model = inject_adapter_in_model(lora, model)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p)  # non-zero so the round trip is meaningful
    return model


def test_peft_names_map_to_official(tiny):
    sd = peft_model(tiny).state_dict()
    assert "llama.layers.0.attention.wq.base_layer.weight" in sd
    assert "llama.layers.0.attention.wq.base_layer.bias" in sd
    assert "llama.layers.0.attention.wq.lora_A.default.weight" in sd
    assert "llama.layers.1.feed_forward.w2.lora_B.default.weight" in sd
    official = ours_to_official(sd)
    pairs = {
        "llama.layers.0.attention.lora_wq_l1.weight": "llama.layers.0.attention.wq.lora_A.default.weight",
        "llama.layers.1.feed_forward.lora_w2_l2.weight": "llama.layers.1.feed_forward.w2.lora_B.default.weight",
        "llama.layers.0.attention.wq.bias": "llama.layers.0.attention.wq.base_layer.bias",
        "llama.layers.0.attention.wk.weight": "llama.layers.0.attention.wk.base_layer.weight",
    }
    assert all(official[theirs] is sd[mine] for theirs, mine in pairs.items())
    assert list(official_to_ours(official)) == list(sd)
    # peft's own adapter-only export (no ".default.") maps too
    assert "llama.layers.0.attention.lora_wv_l2.weight" in ours_to_official(
        {"llama.layers.0.attention.wv.lora_B.weight": torch.zeros(1)})


def trainable_finetune_sd(model: nn.Module) -> dict[str, torch.Tensor]:
    """The official stage-1 + stage-2 trainables (the 7B.pth set), minus the bias-free wk/wv (none here)."""
    def keep(n: str) -> bool:
        if n.startswith("llama."):
            return any(s in n for s in ("gate", "norm", "bias", "lora"))
        return n.startswith(("image_bind_", "prefix_query."))
    return {n: t for n, t in model.state_dict().items() if keep(n)}


def test_official_export_import_round_trip(tmp_path, tiny):
    model = peft_model(tiny)
    trainable = trainable_finetune_sd(model)
    # wk/wv carry no bias officially: our dummy also has none, so the sets agree
    export_official_adapter(trainable, tmp_path / "7B.pth", "finetune", cfg=tiny)
    raw = safe_load(tmp_path / "7B.pth")
    assert set(raw) == {"model"}
    assert list(raw["model"]) == official_adapter_keys(tiny, "finetune")
    back = load_official_adapter(tmp_path / "7B.pth", cfg=tiny, stage="finetune")
    assert_same(back, trainable)
    # the full state dict (encoder + frozen LLaMA) exports the same file
    export_official_adapter(model.state_dict(), tmp_path / "full.pth", "finetune")
    assert_same(safe_load(tmp_path / "full.pth")["model"], raw["model"])
    # stage 1: bind network + prefix + gates only
    export_official_adapter(trainable, tmp_path / "pre.pth", "pretrain", cfg=tiny)
    pre = safe_load(tmp_path / "pre.pth")["model"]
    assert list(pre) == official_adapter_keys(tiny, "pretrain")
    assert all(k.startswith(("image_bind_", "prefix_query")) or k.endswith(".gate") for k in pre)
    assert not list(tmp_path.glob(".*.tmp"))


def test_official_import_rules(tmp_path, tiny):
    model = peft_model(tiny)
    official = ours_to_official(model.state_dict())
    legacy_named = {k.replace("llama.", "llma.", 1): v for k, v in official.items()}
    legacy_named["prefix_projector_norm.weight"] = torch.ones(3)
    torch.save({"model": legacy_named, "config": {"legacy_bridge": False}}, tmp_path / "ckpt.pth")
    got = load_official_adapter(tmp_path / "ckpt.pth", cfg=tiny)
    assert_same(got, trainable_finetune_sd(model))
    assert not any(k.startswith("image_bind.") or k.endswith("wq.base_layer.weight") for k in got)


def test_official_export_errors(tmp_path, tiny):
    trainable = trainable_finetune_sd(peft_model(tiny))
    missing = {k: v for k, v in trainable.items() if k != "llama.layers.1.attention.gate"}
    with pytest.raises(CheckpointError, match=r"missing key.*llama\.layers\.1\.attention\.gate"):
        export_official_adapter(missing, tmp_path / "a.pth", "finetune", cfg=tiny)
    with pytest.raises(CheckpointError, match=r"unexpected key.*'mystery\.weight'"):
        export_official_adapter(dict(trainable, **{"mystery.weight": torch.zeros(1)}), tmp_path / "a.pth", "finetune")
    bad = dict(trainable, **{"prefix_query.weight": torch.zeros(3, 64)})
    with pytest.raises(CheckpointError, match=r"prefix_query\.weight.*\[3, 64\].*\[2, 64\]"):
        export_official_adapter(bad, tmp_path / "a.pth", "finetune", cfg=tiny)
    assert not (tmp_path / "a.pth").exists()


def test_official_import_shape_mismatch_names_file_key_shapes(tmp_path, tiny):
    sd = ours_to_official(trainable_finetune_sd(peft_model(tiny)))
    sd["llama.layers.0.attention.lora_wk_l2.weight"] = torch.zeros(64, 4)
    torch.save({"model": sd}, tmp_path / "adapter.pth")
    with pytest.raises(CheckpointError) as e:
        load_official_adapter(tmp_path / "adapter.pth", cfg=tiny)
    msg = str(e.value)
    assert "adapter.pth" in msg and "llama.layers.0.attention.lora_wk_l2.weight" in msg
    assert "[64, 4]" in msg and "[32, 4]" in msg
    torch.save({"model": {**sd, "llama.layers.0.attention.lora_wk_l2.weight": torch.zeros(32, 4),
                          "image_bind_f1_1.bias": torch.zeros(256)}}, tmp_path / "legacy.pth")
    with pytest.raises(CheckpointError, match=r"legacy\.pth.*image_bind_f1_1\.bias.*legacy"):
        load_official_adapter(tmp_path / "legacy.pth")


def test_7b_official_key_set_counts():
    cfg = llama_preset("7B")
    fin, pre = official_adapter_shapes(cfg, "finetune"), official_adapter_shapes(cfg, "pretrain")
    assert len(pre) == 2 + 3 + 9 + 1 + 32
    assert len(fin) == len(pre) + 32 * (2 + 8 + 3 + 6 + 2) + 1
    meta = {k: torch.empty(s, device="meta") for k, s in fin.items()}
    ours = official_to_ours(meta)
    assert "llama.layers.31.feed_forward.w2.lora_B.default.weight" in ours
    assert ours_to_official(ours).keys() == meta.keys()
    total = sum(t.numel() for t in ours.values())
    stage1 = sum(torch.Size(s).numel() for s in pre.values())
    assert stage1 == 608_322_560  # the official stage-1 (pretrain) total
    assert total - stage1 == 41_340_928  # the official stage-2 (finetune) total
    assert total == 649_663_488
    lora = sum(t.numel() for k, t in ours.items() if "lora" in k)
    assert lora == 39_976_960


# ------------------------------------------------------------------------------------------------ safe loading


class _Evil:
    marker: str = ""

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_safe_load_refuses_code(tmp_path):
    marker = tmp_path / "MARKER"
    evil = _Evil()
    evil.marker = str(marker)
    torch.save({"model": {"x": evil}}, tmp_path / "evil.pth")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": evil}, f, protocol=2)
    assert not marker.exists()
    for name in ("evil.pth", "evil.pkl"):
        with pytest.raises(CheckpointError, match=rf"{name}.*execute code"):
            safe_load(tmp_path / name)
        with pytest.raises(CheckpointError, match=name):
            load_official_adapter(tmp_path / name)
    assert not marker.exists()


def test_safe_load_missing_and_corrupt(tmp_path):
    with pytest.raises(CheckpointError, match=r"not found: .*absent\.pth"):
        safe_load(tmp_path / "absent.pth")
    save_atomic({"w": torch.ones(3)}, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth.*corrupt"):
        safe_load(tmp_path / "cut.pth")
    (tmp_path / "junk.pth").write_bytes(b"hello world" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.pth"):
        safe_load(tmp_path / "junk.pth", "LLaMA shard")
    (tmp_path / "junk.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=r"junk\.safetensors"):
        safe_load(tmp_path / "junk.safetensors")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(safe_load(tmp_path / "legacy.pth")["w"], torch.ones(2))


def test_save_atomic_formats(tmp_path):
    w = torch.randn(4, 3)
    save_atomic({"a": w, "b": w, "view": w[1]}, tmp_path / "x.safetensors")
    got = safe_load(tmp_path / "x.safetensors")
    assert torch.equal(got["a"], w) and torch.equal(got["b"], w) and torch.equal(got["view"], w[1])
    save_atomic({"a": w}, tmp_path / "sub" / "x.pth")
    assert torch.equal(safe_load(tmp_path / "sub" / "x.pth")["a"], w)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub", "x.pth", "x.safetensors"]
    assert oct(os.stat(tmp_path / "sub" / "x.pth").st_mode & 0o777) != "0o600"


def test_check_state_dict_messages():
    with pytest.raises(CheckpointError, match=r"f\.pth: unexpected key\(s\) \['b'\]"):
        check_state_dict({"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": (1,)}, "f.pth")
    check_state_dict({"a": torch.zeros(1)}, {"a": (1,), "c": (2,)}, "f.pth", allow_missing=True)


def test_load_llama_dispatch_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_llama(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a LLaMA folder"):
        load_llama(tmp_path)


def test_official_to_ours_stage_of_the_target(tiny):
    """Stage-1 names (plain wq.weight) load into a stage-2 (peft) model when told the target."""
    stage2 = peft_model(tiny).state_dict()
    stage1 = {k.replace(".base_layer", ""): v for k, v in stage2.items() if "lora_" not in k}
    plain = official_to_ours(stage1)
    assert "llama.layers.0.attention.wq.weight" in plain  # no LoRA keys, no target: names stay plain
    for mapped in (official_to_ours(stage1, target=stage2.keys()), official_to_ours(stage1, lora=True)):
        assert set(mapped) <= set(stage2) and "llama.layers.0.attention.wq.base_layer.bias" in mapped
    assert official_to_ours(ours_to_official(stage2), lora=False)["llama.layers.0.attention.wq.weight"] is not None
