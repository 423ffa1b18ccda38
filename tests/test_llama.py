"""LLaMA decoder: RoPE layout, norms, GQA, KV cache, and the gated visual injection."""

import copy

import pytest
import torch

from ibllm.config import llama_preset
from ibllm.models.llama import LLaMA, Attention, RMSNorm, apply_rope, rope_tables


def randomize(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module


def test_rope_matches_complex_multiplication():
    x = torch.randn(2, 5, 3, 8)
    cos, sin = rope_tables(8, 16, 10000.0)
    out = apply_rope(x, cos[:5], sin[:5])
    freqs = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    angles = torch.outer(torch.arange(5).float(), freqs)
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, 5, 3, 4, 2)) * torch.polar(torch.ones_like(angles), angles)[None, :, None])
    torch.testing.assert_close(out, ref.flatten(-2))


def test_rmsnorm_normalises_in_fp32_and_casts_back():
    norm = RMSNorm(16, eps=1e-6)
    x = torch.randn(4, 16).to(torch.bfloat16)
    y = norm(x)
    xf = x.float()
    expected = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16).float()
    assert y.dtype == torch.float32  # bf16 activations times the fp32 weight promote
    torch.testing.assert_close(y, expected)


def test_gqa_equals_repeated_kv_heads():
    cfg = llama_preset("tiny")  # 4 heads, 2 kv heads
    gqa = randomize(Attention(cfg))
    full_cfg = llama_preset("tiny", n_kv_heads=None)
    full = Attention(full_cfg)
    hd = cfg.head_dim
    with torch.no_grad():
        full.wq.weight.copy_(gqa.wq.weight)
        full.wo.weight.copy_(gqa.wo.weight)
        full.gate.copy_(gqa.gate)
        for name in ("wk", "wv"):
            w = getattr(gqa, name).weight.view(cfg.kv_heads, hd, cfg.dim)
            getattr(full, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(-1, cfg.dim))
    x = torch.randn(2, 7, cfg.dim)
    cos, sin = rope_tables(hd, 7, cfg.rope_theta)
    torch.testing.assert_close(gqa(x, cos, sin), full(x, cos, sin), atol=1e-5, rtol=1e-5)


def test_injection_adds_gated_wv_projection_before_wo():
    cfg = llama_preset("tiny", n_kv_heads=None)
    attn = randomize(Attention(cfg))
    x = torch.randn(2, 5, cfg.dim)
    adapter = torch.randn(2, 1, cfg.dim)
    cos, sin = rope_tables(cfg.head_dim, 5, cfg.rope_theta)
    plain = attn(x, cos, sin)
    injected = attn(x, cos, sin, adapter=attn.adapter_state(adapter))
    gate = torch.tanh(attn.gate).view(cfg.n_heads, 1)
    per_head = attn.wv(adapter).view(2, 1, cfg.n_heads, cfg.head_dim) * gate
    expected = per_head.reshape(2, 1, cfg.dim) @ attn.wo.weight.T  # every position gets the same vector
    torch.testing.assert_close(injected - plain, expected.expand(-1, 5, -1), atol=1e-5, rtol=1e-4)


def test_zero_gate_gives_the_plain_decoder():
    cfg = llama_preset("tiny")
    model = randomize(LLaMA(cfg))
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.gate.zero_()
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    adapters = model.adapter_states(torch.randn(2, 1, cfg.dim), torch.randn(cfg.n_layers, 1, cfg.dim))
    assert torch.equal(model(tokens, adapters), model(tokens))


def test_query_layer_injects_only_the_last_layers():
    cfg = llama_preset("tiny", n_layers=3, query_layer=2)
    model = LLaMA(cfg)
    states = model.adapter_states(torch.randn(1, 1, cfg.dim), torch.randn(2, 1, cfg.dim))
    assert states[0] is None and all(s is not None for s in states[1:])


def test_chunked_prefill_after_cache_equals_full_forward():
    """A multi-token chunk at start_pos > 0 sees the cached prefix causally (official bug D12 fixed)."""
    cfg = llama_preset("tiny")
    model = randomize(LLaMA(cfg), seed=3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 10))
    full = model(tokens)
    caches = model.new_cache(2, 16, torch.device("cpu"), torch.float32)
    first = model(tokens[:, :4], start_pos=0, caches=caches)
    second = model(tokens[:, 4:], start_pos=4, caches=caches)
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_storage():
    cfg = llama_preset("tiny", tie_embeddings=True)
    model = LLaMA(cfg)
    assert model.output.weight is model.tok_embeddings.weight
    assert "output.weight" in model.state_dict()


def test_rope_table_bound_is_reported():
    model = LLaMA(llama_preset("tiny", max_seq_len=4))
    with pytest.raises(ValueError, match="RoPE"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_hidden_dim_rule_matches_meta_7b():
    assert llama_preset("7B").hidden_dim == 11008
    assert llama_preset("smollm2-135m").hidden_dim == 1536
    assert copy.deepcopy(llama_preset("7B")).head_dim == 128
