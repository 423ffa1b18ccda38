"""ImageBind encoders: state-dict layout, attention numerics, forward semantics, strict loading."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ibllm.config import imagebind_preset
from ibllm.models.imagebind import ImageBindModel, build_imagebind, imagebind_summary, load_imagebind
from ibllm.models.imagebind.attention import MultiheadAttention
from ibllm.models.imagebind.stems import interpolate_pos_embed
from ibllm.models.imagebind.trunk import DropPath

B = 2
SCALES = {"vision": 1.0, "text": 1 / 0.07, "audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0, "point": 1.0}


def tiny_inputs(batch: int = B, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 1000, (batch, 77), generator=g)
    text[:, 5] = 49407  # EOT
    text[:, 6:] = 0
    return {
        "vision": torch.randn(batch, 3, 224, 224, generator=g),
        "text": text,
        "audio": torch.randn(batch, 1, 128, 204, generator=g),
        "depth": torch.randn(batch, 1, 224, 224, generator=g),
        "thermal": torch.randn(batch, 1, 224, 224, generator=g),
        "imu": torch.randn(batch, 6, 2000, generator=g),
        "point": torch.rand(batch, 256, 3, generator=g) * 2 - 1,
    }


@pytest.fixture(scope="module")
def tiny() -> ImageBindModel:
    torch.manual_seed(0)
    return build_imagebind("tiny")


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory, tiny: ImageBindModel) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "imagebind_tiny.pth"
    torch.save(tiny.state_dict(), path)
    return path


# --------------------------------------------------------------------------------------- layout


def test_huge_state_dict_layout_on_meta() -> None:
    with torch.device("meta"):
        model = ImageBindModel(imagebind_preset("huge"))
    state = model.state_dict()
    assert len(state) == 1311
    assert model.modalities == ("vision", "text", "audio", "depth", "thermal", "imu")
    expected = {
        "modality_preprocessors.vision.cls_token": (1, 1, 1280),
        "modality_preprocessors.vision.rgbt_stem.proj.1.weight": (1280, 3, 2, 14, 14),
        "modality_preprocessors.vision.pos_embedding_helper.pos_embed": (1, 257, 1280),
        "modality_preprocessors.text.pos_embed": (1, 77, 1024),
        "modality_preprocessors.text.mask": (77, 77),
        "modality_preprocessors.text.token_embedding.weight": (49408, 1024),
        "modality_preprocessors.audio.rgbt_stem.proj.weight": (768, 1, 16, 16),
        "modality_preprocessors.audio.rgbt_stem.norm_layer.bias": (768,),
        "modality_preprocessors.audio.pos_embedding_helper.pos_embed": (1, 229, 768),
        "modality_preprocessors.depth.depth_stem.proj.weight": (384, 1, 16, 16),
        "modality_preprocessors.depth.pos_embedding_helper.pos_embed": (1, 197, 384),
        "modality_preprocessors.thermal.rgbt_stem.norm_layer.weight": (768,),
        "modality_preprocessors.thermal.pos_embedding_helper.pos_embed": (1, 197, 768),
        "modality_preprocessors.imu.pos_embed": (1, 251, 512),
        "modality_preprocessors.imu.cls_token": (1, 1, 512),
        "modality_preprocessors.imu.imu_stem.proj.weight": (512, 48),
        "modality_preprocessors.imu.imu_stem.norm_layer.weight": (512,),
        "modality_trunks.vision.pre_transformer_layer.0.weight": (1280,),
        "modality_trunks.vision.blocks.31.attn.in_proj_weight": (3840, 1280),
        "modality_trunks.vision.blocks.31.attn.in_proj_bias": (3840,),
        "modality_trunks.text.blocks.23.attn.out_proj.weight": (1024, 1024),
        "modality_trunks.audio.blocks.3.attn.bias_k": (1, 1, 768),
        "modality_trunks.imu.blocks.5.attn.bias_v": (1, 1, 512),
        "modality_trunks.depth.blocks.11.mlp.fc1.weight": (1536, 384),
        "modality_trunks.thermal.blocks.0.mlp.fc2.weight": (768, 3072),
        "modality_trunks.text.blocks.0.norm_1.weight": (1024,),
        "modality_trunks.audio.blocks.11.norm_2.bias": (768,),
        "modality_heads.vision.0.weight": (1280,),
        "modality_heads.vision.2.weight": (1024, 1280),
        "modality_heads.text.proj.0.bias": (1024,),
        "modality_heads.text.proj.1.weight": (1024, 1024),
        "modality_heads.depth.2.weight": (1024, 384),
        "modality_heads.imu.3.weight": (1024, 512),
        "modality_postprocessors.text.1.log_logit_scale": (),
        "modality_postprocessors.imu.1.log_logit_scale": (),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("point_trunk") or ".point." in k for k in state)
    assert not any("bias_k" in k for k in state if ".vision." in k or ".text." in k)
    assert "modality_trunks.vision.blocks.32.attn.in_proj_weight" not in state
    assert "modality_trunks.text.pre_transformer_layer.0.weight" not in state


def test_huge_w3d_adds_point_keys() -> None:
    summary = imagebind_summary("huge_w3d")
    shapes = summary["shapes"]
    point_keys = [k for k in summary["keys"] if k.startswith("point_trunk.") or ".point." in k]
    assert summary["num_keys"] == 1311 + len(point_keys) == 1476
    expected = {
        "modality_heads.point.0.weight": [512],
        "modality_heads.point.2.weight": [1024, 512],
        "modality_postprocessors.point.1.log_logit_scale": [],
        "point_trunk.pc_projection": [768, 512],
        "point_trunk.point_encoder.cls_pos": [1, 1, 384],
        "point_trunk.point_encoder.encoder.first_conv.0.weight": [128, 3, 1],
        "point_trunk.point_encoder.encoder.first_conv.1.num_batches_tracked": [],
        "point_trunk.point_encoder.encoder.first_conv.3.weight": [256, 128, 1],
        "point_trunk.point_encoder.encoder.second_conv.1.running_var": [512],
        "point_trunk.point_encoder.encoder.second_conv.3.weight": [256, 512, 1],
        "point_trunk.point_encoder.reduce_dim.weight": [384, 256],
        "point_trunk.point_encoder.pos_embed.2.weight": [384, 128],
        "point_trunk.point_encoder.blocks.blocks.7.attn.qkv.weight": [1152, 384],
        "point_trunk.point_encoder.blocks.blocks.11.attn.proj.bias": [384],
        "point_trunk.point_encoder.blocks.blocks.11.mlp.fc1.weight": [1536, 384],
        "point_trunk.point_encoder.norm.weight": [384],
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert "point_trunk.point_encoder.blocks.blocks.7.attn.qkv.bias" not in shapes
    assert "point_trunk.point_encoder.blocks.blocks.12.norm1.weight" not in shapes


def test_summary_counts_and_partial_build() -> None:
    vision = imagebind_summary("huge", ["vision"])
    full = imagebind_summary("huge")
    assert vision["modalities"] == ["vision"]
    assert vision["params"]["vision"] == full["params"]["vision"]
    assert full["total_params"] == sum(full["params"].values())
    assert all(".vision." in k for k in vision["keys"])
    model = build_imagebind("tiny", ["text", "point"])
    assert model.modalities == ("text", "point")
    assert set(model.modality_trunks) == {"text"}
    with pytest.raises(KeyError, match="vision"):
        model({"vision": torch.zeros(1, 3, 224, 224)})
    with pytest.raises(ValueError, match="point"):
        build_imagebind("demo", ["point"])
    with pytest.raises(ValueError, match="sonar"):
        build_imagebind("tiny", ["sonar"])


def test_postprocessor_state_kinds(tiny: ImageBindModel) -> None:
    params = dict(tiny.named_parameters())
    buffers = dict(tiny.named_buffers())
    text = "modality_postprocessors.text.1.log_logit_scale"
    assert text in params and params[text].ndim == 0
    assert math.isclose(params[text].item(), math.log(1 / 0.07), rel_tol=1e-6)
    for m in ("audio", "depth", "thermal", "imu", "point"):
        key = f"modality_postprocessors.{m}.1.log_logit_scale"
        assert key in buffers and key not in params and buffers[key].ndim == 0
        assert math.isclose(buffers[key].exp().item(), SCALES[m], rel_tol=1e-6)
    assert not any("modality_postprocessors.vision" in k for k in tiny.state_dict())
    mask = buffers["modality_preprocessors.text.mask"]
    assert torch.equal(mask, torch.full((77, 77), float("-inf")).triu(1))


# ------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("add_bias_kv", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_attention_matches_torch_mha(add_bias_kv: bool, causal: bool) -> None:
    torch.manual_seed(0)
    dim, heads, length = 48, 4, 11
    ref = nn.MultiheadAttention(dim, heads, bias=True, add_bias_kv=add_bias_kv).eval()
    with torch.no_grad():  # non-zero biases so every term is exercised
        ref.in_proj_bias.normal_()
        ref.out_proj.bias.normal_()
    ours = MultiheadAttention(dim, heads, bias=True, add_bias_kv=add_bias_kv)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, length, dim)
    mask = torch.full((length, length), float("-inf")).triu(1) if causal else None
    expected = ref(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), attn_mask=mask,
                   need_weights=False)[0].transpose(0, 1)
    torch.testing.assert_close(ours(x, mask), expected, atol=1e-5, rtol=1e-5)
    if causal:  # a bool mask follows nn.MultiheadAttention (True = blocked)
        torch.testing.assert_close(ours(x, mask.isinf()), expected, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------- forward


def test_forward_every_modality(tiny: ImageBindModel) -> None:
    inputs = tiny_inputs()
    out = tiny(inputs, point_seed=0)
    assert set(out) == set(inputs)
    for name, emb in out.items():
        assert emb.shape == (B, 32), name
        assert torch.isfinite(emb).all(), name
        torch.testing.assert_close(emb.norm(dim=-1), torch.full((B,), SCALES[name]), rtol=1e-4, atol=1e-4)
    # modalities are encoded independently: one at a time gives the same result
    alone = tiny({"audio": inputs["audio"]})
    torch.testing.assert_close(alone["audio"], out["audio"])


def test_prenorm_returns_head_outputs(tiny: ImageBindModel) -> None:
    inputs = tiny_inputs()
    del inputs["point"]
    post, pre = tiny(inputs, prenorm=True)
    for name in inputs:
        expected = torch.nn.functional.normalize(pre[name], dim=-1) * SCALES[name]
        torch.testing.assert_close(post[name], expected, rtol=1e-4, atol=1e-5)


def test_multiclip_mean_after_postprocessor(tiny: ImageBindModel) -> None:
    g = torch.Generator().manual_seed(1)
    video = torch.randn(B, 3, 3, 2, 224, 224, generator=g)
    audio = torch.randn(B, 3, 1, 128, 204, generator=g)
    out, pre = tiny({"vision": video, "audio": audio}, prenorm=True)
    for name, x in (("vision", video), ("audio", audio)):
        clips = [tiny({name: x[:, s:s + 1]}, prenorm=True) for s in range(x.shape[1])]
        torch.testing.assert_close(out[name], torch.stack([c[0][name] for c in clips]).mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pre[name], torch.stack([c[1][name] for c in clips]).mean(0), atol=1e-5, rtol=1e-5)
        assert (out[name].norm(dim=-1) < SCALES[name] + 1e-4).all()  # not renormalised


def test_image_equals_two_frame_repeat(tiny: ImageBindModel) -> None:
    img = tiny_inputs()["vision"]
    a = tiny({"vision": img})["vision"]
    b = tiny.encode("vision", img.unsqueeze(2).repeat(1, 1, 2, 1, 1))[0]
    torch.testing.assert_close(a, b)


def test_text_is_causal_and_pools_eot(tiny: ImageBindModel) -> None:
    text = tiny_inputs()["text"]
    changed = text.clone()
    changed[:, 6:] = 123  # tokens after EOT (lower ids) cannot reach the EOT position
    torch.testing.assert_close(tiny({"text": text})["text"], tiny({"text": changed})["text"])
    earlier = text.clone()
    earlier[:, 2] = 77
    assert not torch.allclose(tiny({"text": text})["text"], tiny({"text": earlier})["text"])


def test_pos_embed_interpolation() -> None:
    pos = torch.randn(1, 1 + 64, 8)
    same = interpolate_pos_embed(pos, (1, 8, 8), (1, 8, 8), 1)
    torch.testing.assert_close(same, pos)
    bigger = interpolate_pos_embed(pos, (1, 8, 8), (1, 10, 10), 1)
    assert bigger.shape == (1, 101, 8)
    torch.testing.assert_close(bigger[:, :1], pos[:, :1])
    model = build_imagebind("tiny", ["vision"])
    out = model({"vision": torch.randn(1, 3, 280, 280)})["vision"]  # 10x10 patches
    assert out.shape == (1, 32)


def test_frozen_stays_eval(tiny: ImageBindModel) -> None:
    assert not any(p.requires_grad for p in tiny.parameters())
    assert not tiny.training
    tiny.train()
    assert not tiny.training and not any(m.training for m in tiny.modules())
    parent = nn.Sequential(tiny, nn.Linear(2, 2))
    parent.train()
    assert parent[1].training and not tiny.training
    # an unfrozen model trains normally (e.g. when pretraining a demo tower)
    free = ImageBindModel(imagebind_preset("tiny"), ["vision"])
    assert free.training and all(p.requires_grad for p in free.parameters())


def test_drop_path_inactive_in_eval() -> None:
    cfg = imagebind_preset("tiny")
    cfg.imu = dataclasses.replace(cfg.imu, drop_path=0.9, num_blocks=2)
    model = build_imagebind(cfg, ["imu"])
    assert [b.drop_path.p for b in model.modality_trunks["imu"].blocks] == pytest.approx([0.0, 0.9])
    x = torch.randn(4, 6, 2000)
    torch.testing.assert_close(model({"imu": x})["imu"], model({"imu": x})["imu"])
    drop = DropPath(0.5)
    ones = torch.ones(64, 3)
    assert torch.equal(drop.eval()(ones), ones)
    y = drop.train()(ones)
    assert set(y.unique().tolist()) <= {0.0, 2.0} and (y == 0).any() and (y == 2).any()
    assert (y == y[:, :1]).all()  # whole samples are dropped


def test_bfloat16_build_runs() -> None:
    model = build_imagebind("tiny", ["vision", "text"], dtype=torch.bfloat16)
    inputs = tiny_inputs(1)
    out = model({"vision": inputs["vision"], "text": inputs["text"]})
    assert out["vision"].dtype == torch.bfloat16 and torch.isfinite(out["text"].float()).all()


# -------------------------------------------------------------------------------------- loading


def test_strict_load_round_trip(tiny: ImageBindModel, tiny_file: Path, tmp_path: Path) -> None:
    inputs = tiny_inputs()
    expected = tiny(inputs, point_seed=3)
    loaded = load_imagebind(tiny_file, "tiny")
    assert loaded.frozen and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not any(t.is_meta for t in loaded.state_dict().values())
    for name, emb in loaded(inputs, point_seed=3).items():
        torch.testing.assert_close(emb, expected[name], rtol=0, atol=0)
    # nested under 'model' with the ImageBind-LLM 'image_bind.' prefix, plus foreign keys
    nested = tmp_path / "full.pth"
    torch.save({"model": {**{f"image_bind.{k}": v for k, v in tiny.state_dict().items()},
                          "llama.tok_embeddings.weight": torch.zeros(2, 2)}}, nested)
    again = load_imagebind(nested, "tiny", ["vision"])
    torch.testing.assert_close(again({"vision": inputs["vision"]})["vision"], expected["vision"])
    # safetensors
    from safetensors.torch import save_file

    st = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(st))
    torch.testing.assert_close(load_imagebind(st, "tiny", ["imu"])({"imu": inputs["imu"]})["imu"], expected["imu"])


def test_partial_modality_load(tiny_file: Path) -> None:
    model = load_imagebind(tiny_file, "tiny", modalities=["audio", "point"], dtype=torch.bfloat16)
    assert model.modalities == ("audio", "point")
    keys = list(model.state_dict())
    assert keys and all(".audio." in k or ".point." in k or k.startswith("point_trunk.") for k in keys)
    assert model.modality_heads["audio"][2].weight.dtype == torch.bfloat16


def _write(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save(state, path)
    return path


def test_load_errors_name_file_and_key(tiny: ImageBindModel, tmp_path: Path) -> None:
    state = tiny.state_dict()
    missing_key = "modality_trunks.depth.blocks.0.attn.bias_k"
    path = _write(tmp_path / "missing.pth", {k: v for k, v in state.items() if k != missing_key})
    with pytest.raises(ValueError) as err:
        load_imagebind(path, "tiny")
    assert str(path) in str(err.value) and missing_key in str(err.value) and "missing" in str(err.value)
    load_imagebind(path, "tiny", ["vision", "text"])  # depth not requested: fine

    extra = "modality_trunks.vision.blocks.0.attn.bias_k"
    path = _write(tmp_path / "unexpected.pth", {**state, extra: torch.zeros(1, 1, 32), "foo.bar": torch.zeros(1)})
    with pytest.raises(ValueError) as err:
        load_imagebind(path, "tiny")
    assert str(path) in str(err.value) and extra in str(err.value) and "foo.bar" in str(err.value)

    wrong = "modality_heads.vision.2.weight"
    path = _write(tmp_path / "shape.pth", {**state, wrong: torch.zeros(32, 16)})
    with pytest.raises(ValueError) as err:
        load_imagebind(path, "tiny")
    msg = str(err.value)
    assert str(path) in msg and wrong in msg and "(32, 32)" in msg and "(32, 16)" in msg

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_imagebind(corrupt, "tiny")
    truncated = tmp_path / "truncated.pth"
    torch.save(state, truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.pth"):
        load_imagebind(truncated, "tiny")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_imagebind(tmp_path / "nowhere.pth", "tiny")
