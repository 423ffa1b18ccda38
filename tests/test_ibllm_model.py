"""ImageBindLLM: stages, LoRA identity at init, loss semantics, mixing, generation."""

import pytest
import torch

from ibllm import tuning
from ibllm.config import llama_preset
from ibllm.generation import generate_tokens, sample_top_p
from ibllm.models.ibllm import ImageBindLLM, lm_loss, mix_embeddings


class FakeEncoder(torch.nn.Module):
    """A frozen stand-in encoder: mean-pools the input through a fixed projection per branch."""

    modalities = ("vision", "audio")

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, dim)

    def forward(self, inputs):
        return {k: self.proj(v.flatten(2).mean(-1)) for k, v in inputs.items()}


def perturbed(model: torch.nn.Module, seed: int = 0, names=lambda n: True) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if names(n) and "lora_B" not in n and not n.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def test_lora_with_zero_b_and_zero_bias_is_the_identity():
    cfg = llama_preset("tiny")
    stage1 = perturbed(ImageBindLLM(cfg, stage="pretrain"))
    stage2 = ImageBindLLM(cfg, stage="finetune")
    from ibllm.checkpoints import ours_to_official, official_to_ours  # the one naming map
    official = ours_to_official(stage1.state_dict())
    missing, unexpected = stage2.load_state_dict(official_to_ours(official, lora=True), strict=False)
    assert not unexpected
    assert all("lora" in k or "bias" in k for k in missing)
    tokens = torch.randint(0, cfg.vocab_size, (2, 6))
    feature = torch.randn(2, cfg.visual_dim)
    torch.testing.assert_close(stage2(tokens, feature=feature), stage1(tokens, feature=feature))


def test_loss_ignores_minus_100_but_counts_token_zero():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    labels = torch.tensor([[-100, 0, 3, -100]])
    expected = torch.nn.functional.cross_entropy(logits[0, :2], torch.tensor([0, 3]))
    torch.testing.assert_close(lm_loss(logits, labels), expected)
    empty = lm_loss(logits, torch.full((1, 4), -100))
    assert empty.item() == 0.0
    empty.backward()  # the graph stays alive
    assert logits.grad is not None


def test_mixing_normalises_weights_and_rejects_zero_sum():
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    mixed = mix_embeddings([a, b], [0.4, 0.6])
    na, nb = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    torch.testing.assert_close(mixed, (0.4 * na + 0.6 * nb) / (1 + 1e-6))
    with pytest.raises(ValueError, match="sum to"):
        mix_embeddings([a, b], [1.0, -1.0])


def test_encode_uses_the_frozen_encoder_per_modality():
    cfg = llama_preset("tiny")
    model = ImageBindLLM(cfg, stage="pretrain", encoder=FakeEncoder(cfg.visual_dim))
    model.train()
    assert not model.image_bind.training
    assert not any(p.requires_grad for p in model.image_bind.parameters())
    image, audio = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 5)
    mixed = model.encode({"image": (image, 1.0), "audio": (audio, 3.0)})
    fi = model.image_bind({"vision": image})["vision"]
    fa = model.image_bind({"audio": audio})["audio"]
    expected = mix_embeddings([fi, fa], [1.0, 3.0])
    torch.testing.assert_close(mixed, expected)
    with pytest.raises(ValueError, match="no 'point' branch"):
        model.encode({"point": torch.randn(2, 3, 4)})
    # the training path equals the single-input mix
    torch.testing.assert_close(model.visual_token(image=image), model.bind(model.encode({"image": image})))


def test_inject_mask_turns_rows_back_into_the_plain_decoder():
    cfg = llama_preset("tiny")
    model = perturbed(ImageBindLLM(cfg, stage="pretrain"))
    with torch.no_grad():
        for layer in model.llama.layers:
            layer.attention.gate.fill_(0.5)
    tokens = torch.randint(0, cfg.vocab_size, (2, 5))
    feature = torch.randn(2, cfg.visual_dim)
    out = model(tokens, feature=feature, inject=torch.tensor([True, False]))
    plain = model(tokens)
    assert not torch.allclose(out[0], plain[0])
    torch.testing.assert_close(out[1], plain[1])


def test_gradients_reach_only_the_stage_parameters():
    cfg = llama_preset("tiny")
    for stage in tuning.STAGES:
        model = perturbed(ImageBindLLM(cfg, stage=stage))
        tokens = torch.randint(0, cfg.vocab_size, (2, 6))
        loss = lm_loss(model(tokens, feature=torch.randn(2, cfg.visual_dim)), tokens)
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == tuning.is_trainable(name, stage), name


def test_cached_batched_generation_equals_recompute_and_single_rows():
    torch.manual_seed(0)
    cfg = llama_preset("tiny")
    model = perturbed(ImageBindLLM(cfg, stage="finetune"), seed=1).eval()
    with torch.no_grad():
        for layer in model.llama.layers:
            layer.attention.gate.fill_(0.3)
    visual = model.visual_token(feature=torch.randn(2, cfg.visual_dim))
    prompts = [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13]]
    cached = generate_tokens(model, prompts, visual, max_gen_len=8, temperature=0)
    assert cached == generate_tokens(model, prompts, visual, max_gen_len=8, temperature=0, use_cache=False)
    assert cached == [generate_tokens(model, [p], visual[i:i + 1], max_gen_len=8, temperature=0)[0]
                      for i, p in enumerate(prompts)]
    assert all(len(row) == 8 for row in cached)


def test_generation_stops_each_row_at_eos():
    cfg = llama_preset("tiny")
    model = ImageBindLLM(cfg, stage="pretrain").eval()
    with torch.no_grad():  # make the decoder always predict token 2 (EOS) after token 7
        model.llama.output.weight.zero_()
        model.llama.output.weight[2] = 1.0
        model.llama.norm.weight.fill_(1.0)
        model.llama.tok_embeddings.weight.abs_()
        for layer in model.llama.layers:
            for lin in (layer.attention.wo, layer.feed_forward.w2):
                lin.weight.zero_()
    out = generate_tokens(model, [[1, 7], [1, 7, 7]], max_gen_len=5, temperature=0)
    assert out == [[], []]


def test_top_p_keeps_the_token_that_crosses_p():
    probs = torch.tensor([[0.5, 0.3, 0.2]]).repeat(4000, 1)
    draws = sample_top_p(probs, 0.75, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=3).float() / 4000
    assert counts[2] == 0
    assert abs(counts[0] - 0.625) < 0.03 and abs(counts[1] - 0.375) < 0.03


def test_generation_with_bf16_frozen_weights_runs_without_outer_autocast():
    cfg = llama_preset("tiny")
    model = perturbed(ImageBindLLM(cfg, stage="finetune")).eval()
    tuning.cast_frozen(model, torch.bfloat16)
    visual = model.visual_token(feature=torch.randn(2, cfg.visual_dim))
    out = generate_tokens(model, [[1, 5, 6], [1, 7]], visual, max_gen_len=3, temperature=0)
    assert all(len(row) == 3 for row in out)


def test_training_after_generation_on_a_fresh_model():
    """RoPE tables first built under inference mode must not break a later backward pass."""
    cfg = llama_preset("tiny")
    model = ImageBindLLM(cfg, stage="pretrain")
    generate_tokens(model.eval(), [[1, 5]], model.visual_token(feature=torch.randn(1, cfg.visual_dim)), max_gen_len=2)
    tokens = torch.randint(0, cfg.vocab_size, (1, 6))
    lm_loss(model.train()(tokens, feature=torch.randn(1, cfg.visual_dim)), tokens).backward()
    assert model.image_bind_proj.weight.grad is not None
