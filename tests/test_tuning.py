"""The one stage filter: the trainable sets of each stage, their counts, optimizer groups and the schedule."""

import pytest
import torch

from ibllm import tuning
from ibllm.config import llama_preset
from ibllm.models.ibllm import ImageBindLLM


@pytest.fixture(scope="module")
def models_7b():
    with torch.device("meta"):
        return {stage: ImageBindLLM(llama_preset("7B"), stage=stage) for stage in tuning.STAGES}


def test_7b_trainable_counts_match_spec(models_7b):
    pre = tuning.count_parameters(models_7b["pretrain"], "pretrain")
    fin = tuning.count_parameters(models_7b["finetune"], "finetune")
    assert pre["trainable"] == 608_322_560
    assert pre["trainable/bind_network"] == 608_190_464
    assert pre["trainable/prefix_query"] == 131_072 and pre["trainable/gate"] == 1_024
    assert fin["trainable"] == 41_340_928
    assert fin["trainable/norm"] == 266_240
    assert fin["trainable/bias"] == 1_097_728
    assert fin["trainable/lora"] == 39_976_960


def test_requires_grad_follows_the_filter(models_7b):
    for stage, model in models_7b.items():
        for name, p in model.named_parameters():
            assert p.requires_grad == tuning.is_trainable(name, stage)


def test_filter_rules():
    assert tuning.is_trainable("image_bind_f1_1.weight", "pretrain")
    assert not tuning.is_trainable("image_bind.modality_trunks.vision.blocks.0.norm_1.weight", "pretrain")
    assert tuning.is_trainable("llama.layers.3.attention.gate", "pretrain")
    assert not tuning.is_trainable("llama.layers.3.attention.gate", "finetune")
    assert tuning.is_trainable("llama.layers.3.attention.wq.lora_A.default.weight", "finetune")
    assert tuning.is_trainable("llama.norm.weight", "finetune")
    assert not tuning.is_trainable("image_bind_norm_1.weight", "finetune")
    with pytest.raises(ValueError, match="unknown stage"):
        tuning.is_trainable("x", "stage3")


def test_weight_decay_groups():
    cfg = llama_preset("tiny")
    model = ImageBindLLM(cfg, stage="pretrain")
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = tuning.optimizer_groups(model, "pretrain", 0.05)
    decayed = {names[id(p)] for p in decay["params"]}
    assert "llama.layers.0.attention.gate" in decayed and "prefix_query.weight" in decayed
    assert "image_bind_f2_3.weight" in decayed
    assert {names[id(p)] for p in no_decay["params"]} == {"image_bind_proj.bias", *(f"image_bind_norm_{k}.weight" for k in (1, 2, 3))}
    model = ImageBindLLM(cfg, stage="finetune")
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = tuning.optimizer_groups(model, "finetune", 0.02)
    assert all("lora" in names[id(p)] for p in decay["params"])
    assert all("norm" in names[id(p)] or names[id(p)].endswith(".bias") for p in no_decay["params"])


def test_decay_rule_keeps_order_and_spares_marked_names():
    named = [("a.weight", torch.nn.Parameter(torch.zeros(2, 2))), ("a.bias", torch.nn.Parameter(torch.zeros(2, 1))),
             ("tok.token_embedding.weight", torch.nn.Parameter(torch.zeros(3, 2))),
             ("b.scale", torch.nn.Parameter(torch.zeros(2))), ("c.weight", torch.nn.Parameter(torch.zeros(1, 2, 2)))]
    decay, no_decay = tuning.decay_groups(named, 0.1, no_decay_markers=("token_embedding",))
    params = dict(named)
    assert decay == {"params": [params["a.weight"], params["c.weight"]], "weight_decay": 0.1}
    assert no_decay["params"] == [params["a.bias"], params["tok.token_embedding.weight"], params["b.scale"]]
    assert no_decay["weight_decay"] == 0.0


def test_trainable_state_dict_holds_only_the_stage(models_7b):
    sd = tuning.trainable_state_dict(models_7b["finetune"], "finetune")
    assert sum(t.numel() for t in sd.values()) == 41_340_928


def test_cast_frozen_keeps_trainables_fp32():
    model = ImageBindLLM(llama_preset("tiny"), stage="finetune")
    tuning.cast_frozen(model, torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
