"""Parity with independent implementations: the decoder against Hugging Face ``transformers``' LLaMA, and
CIDEr-D against ``pycocoevalcap`` (both libraries are in the ``dev`` extra)."""

from __future__ import annotations

import math

import pytest
import torch
from pycocoevalcap.cider.cider import Cider
from transformers import LlamaConfig, LlamaForCausalLM

from ibllm.build import build_model
from ibllm.checkpoints import load_hf_llama, load_llama
from ibllm.evaluation.cider import cider_d
from ibllm.models.llama import LLaMA

VOCAB = 97


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny random ``LlamaForCausalLM`` (GQA 8/2 heads, RoPE theta 50000, SwiGLU) saved as safetensors."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=128, hidden_act="silu", tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # default init leaves the norms at 1 and the weights tiny: make every weight matter
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(folder, safe_serialization=True)
    assert (folder / "model.safetensors").is_file()
    tokens = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens).logits
    return folder, tokens, logits


def test_decoder_matches_transformers_llama(hf_llama):
    folder, tokens, want = hf_llama
    cfg, state = load_hf_llama(folder)
    assert (cfg.n_heads, cfg.kv_heads, cfg.rope_theta, cfg.norm_eps) == (8, 2, 50000.0, 1e-5)
    assert load_llama(folder)[0] == cfg
    decoder = LLaMA(cfg).eval()
    missing, unexpected = decoder.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(".gate") for k in missing)  # zero gates: no visual injection
    with torch.no_grad():
        got = decoder(tokens)
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"logits differ from transformers by {err:.3g}"
    assert want.abs().max() > 1.0  # the logits are not trivially small


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_built_model_matches_transformers_llama(hf_llama, stage):
    folder, tokens, want = hf_llama
    model = build_model(str(folder), stage, imagebind="tiny", modalities=()).eval()
    with torch.no_grad():
        got = model(tokens)  # no visual input: the plain decoder (stage 2's zero biases and LoRA add nothing)
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"{stage} model's logits differ from transformers by {err:.3g}"


# Several images, one to five references each, varied lengths; candidates that repeat words (clipping),
# share nothing, equal a reference, are one word long, or are much longer (length penalty). Whitespace
# words exactly as given: case and punctuation are part of a word in the raw mode.
CAPTIONS = [
    ("a dog runs on the beach", ["a dog running on the beach", "a brown dog runs along the sand",
                                 "dog on a beach near the sea"]),
    ("a a a a dog dog", ["a dog and a cat", "two animals a dog and a cat play together"]),
    ("red car", ["a red car parked on a street", "a small red car", "the car is red", "red automobile parked",
                 "a parked car painted red"]),
    ("two people ride bicycles down a long winding mountain road on a sunny afternoon in summer",
     ["two people riding bikes", "cyclists on a mountain road"]),
    ("kitchen", ["a kitchen with a stove and a fridge", "an empty kitchen"]),
    ("A man plays guitar.", ["A man plays guitar.", "a man playing a guitar on stage", "Musician with a guitar ."]),
    ("an airplane flying over clouds", ["a plane in the sky above the clouds"]),
    ("zebras graze", ["three zebras grazing in a field", "zebras eating grass", "a herd of zebras graze"]),
    ("bowl of fruit", ["snowy peaks at dawn", "mountains under snow"]),
]


def test_cider_d_matches_pycocoevalcap():
    candidates = [c for c, _ in CAPTIONS]
    references = [r for _, r in CAPTIONS]
    ours, ours_per_image = cider_d(candidates, references, mode="raw")
    # pycocoevalcap's ``Cider`` is CIDEr-D (clipped tf-idf, Gaussian length penalty with sigma 6, x10) and
    # splits on whitespace, so it scores these strings as they are, with no Java tokenizer.
    theirs, theirs_per_image = Cider().compute_score({i: r for i, (_, r) in enumerate(CAPTIONS)},
                                                     {i: [c] for i, (c, _) in enumerate(CAPTIONS)})
    assert len(ours_per_image) == len(theirs_per_image) == len(CAPTIONS)
    for i, (a, b) in enumerate(zip(ours_per_image, theirs_per_image)):
        assert math.isclose(a, float(b), rel_tol=0, abs_tol=1e-6), f"image {i}: {a} vs {b}"
    assert math.isclose(ours, float(theirs), rel_tol=0, abs_tol=1e-6)
    assert max(ours_per_image) > 1.0 and min(ours_per_image) == 0.0  # a spread of scores, not all zero
