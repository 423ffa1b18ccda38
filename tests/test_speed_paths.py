"""Faster paths compute the same thing: answer-only logits, fused AdamW, prepacked CPU linears."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from ibllm import tuning
from ibllm.config import llama_preset
from ibllm.generation import generate_tokens
from ibllm.lit import fused_adamw_supported, make_adamw
from ibllm.models.ibllm import ImageBindLLM, lm_loss, loss_positions, selected_lm_loss
from ibllm.models.packed import PACKED_ATTR, disable_packed_linears, enable_packed_linears, packing_available


def tiny_model(stage: str, seed: int = 0, bf16: bool = False) -> ImageBindLLM:
    torch.manual_seed(seed)
    model = ImageBindLLM(llama_preset("tiny"), stage=stage)
    for name, param in model.named_parameters():  # move zero-initialised gates / LoRA B so every path matters
        if param.requires_grad:
            param.data.normal_(0, 0.05)
    if bf16:
        tuning.cast_frozen(model, torch.bfloat16)
    return model


def batch(cfg, seed: int = 1, lone_target: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, cfg.vocab_size, (3, 12), generator=gen)
    labels = tokens.clone()
    labels[:, :5] = -100  # prompt
    labels[:, 11:] = -100  # padding of every row
    labels[1, 9:] = -100  # padding of a shorter row
    if lone_target:
        labels[2, 1] = 7  # a lone target inside the prompt
    return tokens, labels, torch.randn(3, cfg.visual_dim, generator=gen)


@pytest.mark.parametrize("lone_target", [True, False], ids=["target-in-prompt", "answers-only"])
@pytest.mark.parametrize("stage", tuning.STAGES)
def test_answer_only_logits_give_the_full_loss_and_gradients(stage, lone_target):
    model = tiny_model(stage)
    tokens, labels, feature = batch(model.cfg, lone_target=lone_target)
    full = lm_loss(model(tokens, feature=feature), labels)
    full.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    at = loss_positions(labels)
    assert int(at.sum()) == int((labels[:, 1:] != -100).sum())
    rows = {}
    for name, module in (("first", model.llama.layers[0].feed_forward), ("last", model.llama.layers[-1].feed_forward)):
        module.register_forward_hook(lambda m, args, out, name=name: rows.__setitem__(name, args[0].shape[1]))
    logits = model(tokens, feature=feature, logits_at=at)
    # Dead work is skipped: no column after the last target (position 10 predicts the last one) reaches any
    # block, and the last block's feed-forward starts at the first target (position 4 predicts position 5).
    assert rows == {"first": 10, "last": 10 if lone_target else 6}
    assert logits.shape == (int(at.sum()), model.cfg.vocab_size)
    selected = selected_lm_loss(logits, labels)
    selected.backward()
    torch.testing.assert_close(selected, full, rtol=1e-6, atol=1e-7)
    for name, grad in full_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-7, msg=name)


def test_no_selected_position_gives_empty_logits():
    model = tiny_model("finetune")
    tokens, _, feature = batch(model.cfg)
    logits = model(tokens, feature=feature, logits_at=torch.zeros_like(tokens, dtype=torch.bool))
    assert logits.shape == (0, model.cfg.vocab_size)


def test_answer_only_logits_refuse_a_kv_cache_or_last_only():
    model = tiny_model("finetune")
    tokens, labels, _ = batch(model.cfg)
    at = loss_positions(labels)
    with pytest.raises(ValueError, match="logits_at"):
        model.llama(tokens, logits_at=at, last_only=True)
    with pytest.raises(ValueError, match="logits_at"):
        model.llama(tokens, logits_at=at, start_pos=2)
    caches = model.llama.new_cache(tokens.shape[0], tokens.shape[1], tokens.device, torch.float32)
    with pytest.raises(ValueError, match="logits_at"):
        model.llama(tokens, logits_at=at, caches=caches)


def test_fused_adamw_is_chosen_on_cpu_and_skips_unsupported_tensors():
    assert fused_adamw_supported([torch.zeros(2, requires_grad=True)])
    assert not fused_adamw_supported([torch.zeros(2, device="meta")])
    model = tiny_model("pretrain")
    optimizer = make_adamw(tuning.optimizer_groups(model, "pretrain", 0.05), lr=1e-3, betas=(0.9, 0.95))
    assert all(group["fused"] for group in optimizer.param_groups)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-mixed"])
@pytest.mark.parametrize("stage", tuning.STAGES)
def test_fused_and_foreach_adamw_reach_the_same_parameters(stage, bf16):
    runs = {}
    for kind in ("fused", "foreach"):
        model = tiny_model(stage, bf16=bf16)
        groups = tuning.optimizer_groups(model, stage, 0.05)
        optimizer = (make_adamw(groups, lr=1e-3, betas=(0.9, 0.95)) if kind == "fused"
                     else torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), foreach=True))
        for step in range(4):
            tokens, labels, feature = batch(model.cfg, seed=10 + step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = lm_loss(model(tokens, feature=feature), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        runs[kind] = tuning.trainable_state_dict(model, stage)
    assert runs["fused"].keys() == runs["foreach"].keys()
    for name, value in runs["fused"].items():
        torch.testing.assert_close(value, runs["foreach"][name], rtol=1e-5, atol=1e-6, msg=name)


def test_packed_linears_decode_bit_identically_and_stay_out_of_training():
    model = tiny_model("finetune", bf16=True).eval()
    prompts = [[5, 9, 11, 3, 8], [7, 6]]
    visual = model.visual_token(feature=torch.randn(2, model.cfg.visual_dim))
    if not packing_available():
        pytest.fail("this torch build lacks oneDNN bf16; the packed path cannot be checked here")
    disable_packed_linears(model)
    plain_logits = _decode_logits(model, prompts, visual)
    with mock.patch("ibllm.generation.enable_packed_linears", lambda m: 0):
        plain = generate_tokens(model, prompts, visual, max_gen_len=6, temperature=0, eos_id=2)
    assert enable_packed_linears(model.llama) > 0
    packed_logits = _decode_logits(model, prompts, visual)
    assert torch.equal(plain_logits, packed_logits)
    assert generate_tokens(model, prompts, visual, max_gen_len=6, temperature=0, eos_id=2) == plain
    assert any(PACKED_ATTR in m.__dict__ for m in model.llama.modules())
    # with gradients flowing (training) the module's own forward runs and gradients reach the LoRA weights
    tokens = torch.tensor([prompts[0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lm_loss(model.train()(tokens), tokens).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
    # a changed weight is packed again
    linear = model.llama.layers[0].feed_forward.w1.get_base_layer()
    x = torch.randn(1, 3, linear.in_features, dtype=torch.bfloat16)
    bias = linear.bias.detach().to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.mul_(0.5)
        linear.bias.data = bias
        torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, linear.weight, bias), rtol=0, atol=0)
    assert linear.__dict__[PACKED_ATTR][0][1] == linear.weight._version
    disable_packed_linears(model)
    assert not any(PACKED_ATTR in m.__dict__ or "forward" in m.__dict__ for m in model.modules())


@torch.inference_mode()
def _decode_logits(model: ImageBindLLM, prompts: list[list[int]], visual: torch.Tensor) -> torch.Tensor:
    """Prefill + three cached single-token steps of the bf16 model under autocast: all the logits."""
    tokens = torch.tensor([p[:2] for p in prompts])
    caches = model.llama.new_cache(2, 8, torch.device("cpu"), torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adapters = model.adapters(visual)
        out = [model.llama(tokens, adapters, caches=caches)]
        for pos in range(2, 5):
            out.append(model.llama(torch.full((2, 1), pos + 3), adapters, start_pos=pos, caches=caches))
    return torch.cat(out, dim=1)
