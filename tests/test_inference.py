"""ibllm.load / InferenceModel on tiny models saved by the test: dims inferred from files, official layouts,
base-model identity, generation, encoding and bad inputs. ``make_tiny_project`` is shared with
test_chat.py and test_export.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ibllm
from ibllm.api import normalise_inputs
from ibllm.checkpoints import CheckpointError, save_atomic, save_meta_llama
from ibllm.checkpoints.adapters import BaseModelMismatch, base_fingerprint, infer_imagebind, read_adapter
from ibllm.config import imagebind_preset, llama_preset
from ibllm.generation import IncrementalDecoder
from ibllm.models.imagebind import build_imagebind

VOCAB = 120  # the conftest sentencepiece model's size


def _randomise(module: torch.nn.Module, stage: str, seed: int) -> None:
    from ibllm import tuning

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuning.trainable_parameters(module, stage):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def save_lightning_ckpt(module, path: Path) -> None:
    """What Lightning writes for our modules (state_dict via on_save_checkpoint + hyper_parameters)."""
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    ckpt["hyper_parameters"] = dict(module.hparams)
    ckpt["epoch"], ckpt["global_step"] = 0, 1
    torch.save(ckpt, path)


def make_tiny_project(root: Path, sp_model: str, seed: int = 0) -> dict[str, Path]:
    """A tiny Meta LLaMA folder (+ tokenizer), a tiny ImageBind file (vision + audio), a stage-1 and a
    stage-2 Lightning checkpoint (the latter with init_from = the former), an image and a wav."""
    import soundfile

    from ibllm.lit import FinetuneModule, PretrainModule

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = llama_preset("tiny", vocab_size=VOCAB)
    from ibllm.models.llama import LLaMA

    base = LLaMA(cfg)
    llama_dir = root / "llama" / "tiny"
    save_meta_llama(cfg, {k: v for k, v in base.state_dict().items() if not k.endswith(".gate")}, llama_dir)
    shutil.copy(sp_model, llama_dir.parent / "tokenizer.model")
    encoder = build_imagebind(imagebind_preset("tiny"), modalities=["vision", "audio"])
    enc_file = root / "encoder.safetensors"
    save_atomic(dict(encoder.state_dict()), enc_file)
    common = dict(llm=str(llama_dir), imagebind="tiny", imagebind_weights=str(enc_file), modalities=["vision"])
    pre = PretrainModule(**common)
    pre.configure_model()
    _randomise(pre.model, "pretrain", seed + 1)
    stage1 = root / "stage1.ckpt"
    save_lightning_ckpt(pre, stage1)
    fin = FinetuneModule(**common, init_from=str(stage1))
    fin.configure_model()
    _randomise(fin.model, "finetune", seed + 2)
    stage2 = root / "stage2.ckpt"
    save_lightning_ckpt(fin, stage2)
    image = root / "a.png"
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
    wav = root / "b.wav"
    soundfile.write(wav, np.sin(np.linspace(0, 900, 16000 * 2)).astype("float32"), 16000)
    return {"llama": llama_dir, "encoder": enc_file, "stage1": stage1, "stage2": stage2, "image": image, "wav": wav,
            "root": root}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sp_model) -> dict[str, Path]:
    return make_tiny_project(tmp_path_factory.mktemp("tiny"), sp_model)


@pytest.fixture(scope="module")
def model(tiny):
    return ibllm.load(adapter=tiny["stage2"])


def test_import_ibllm_is_cheap():
    import subprocess
    import sys

    code = "import sys, ibllm; assert callable(ibllm.load); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_load_infers_everything_from_files(tiny, model):
    # only the adapter: base model, encoder and stage-1 tensors come from what the checkpoint recorded
    assert model.model.stage == "finetune"
    assert model.info["imagebind_preset"] == "tiny"
    assert set(model.modalities) == {"vision", "audio"}
    ckpt = torch.load(tiny["stage2"], weights_only=True)
    lora_a = ckpt["state_dict"]["model.llama.layers.0.attention.wq.lora_A.default.weight"]
    assert model.model.cfg.visual_dim == 32 and model.model.cfg.lora_rank == lora_a.shape[0]
    own = model.model.state_dict()
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(own[k.removeprefix("model.")], v)
    stage1 = torch.load(tiny["stage1"], weights_only=True)["state_dict"]
    assert torch.equal(own["image_bind_proj.weight"], stage1["model.image_bind_proj.weight"])
    assert ckpt["ibllm"]["base_fingerprint"] == model.info["base_fingerprint"]


def test_infer_imagebind_preset(tiny, tmp_path):
    assert infer_imagebind(tiny["encoder"]) == ("tiny", ["audio", "vision"])
    demo = build_imagebind(imagebind_preset("demo"), modalities=["vision", "text"])
    save_atomic(dict(demo.state_dict()), tmp_path / "demo.safetensors")
    assert infer_imagebind(tmp_path / "demo.safetensors") == ("demo", ["text", "vision"])
    with pytest.raises(ValueError, match="does not match preset 'huge'"):
        infer_imagebind(tiny["encoder"], "huge")


def test_generate_batch_and_stream_agree(model, tiny):
    inputs = {"image": [str(tiny["image"])], "audio": [(str(tiny["wav"]), 0.6)]}
    outs = model.generate(inputs, ["Which digit is this?", "red green"], max_gen_len=8, temperature=0)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    ids = model.prompt_ids(["Which digit is this?"])[0]
    streamed = "".join(model.stream_text(ids, model.visual(inputs), max_gen_len=8, temperature=0))
    assert streamed.strip() == outs[0]
    # a single-prompt call equals the batched row (per-row EOS, shared input)
    assert model.generate(inputs, "Which digit is this?", max_gen_len=8, temperature=0) == outs[:1]


def test_encode_mixes_with_weights(model, tiny):
    mixed = model.encode({"image": str(tiny["image"]), "audio": (str(tiny["wav"]), 0.6)})
    a = model.encode({"image": [str(tiny["image"])]})
    b = model.encode({"audio": [str(tiny["wav"])]})
    # single inputs are f/(1+1e-6); the mix is (f_a + 0.6 f_b) / (1.6 + 1e-6)
    expected = (a * (1 + 1e-6) + 0.6 * b * (1 + 1e-6)) / (1.6 + 1e-6)
    torch.testing.assert_close(mixed, expected)


@pytest.mark.parametrize("inputs, match", [
    ({"image": ["missing.png"]}, "missing.png.*file not found"),
    ({"image": ["x.txt"]}, "x.txt"),
    ({"depth": ["a.png"]}, "no 'depth' branch"),
    ({"image": [("a.png", 0.0)]}, "positive"),
    ({"smell": ["a.png"]}, "unknown modality 'smell'"),
])
def test_bad_inputs_are_one_clear_error(model, tiny, tmp_path, inputs, match):
    (tmp_path / "x.txt").write_text("hello")
    shutil.copy(tiny["image"], tmp_path / "a.png")
    fixed = {m: [tuple(str(tmp_path / i[0]) if j == 0 else i[j] for j in range(2)) if isinstance(i, tuple)
                 else str(tmp_path / i) for i in v] for m, v in inputs.items()}
    with pytest.raises(ValueError, match=match) as err:
        model.generate(fixed, ["hi"], max_gen_len=2)
    assert "\n" not in str(err.value)


def test_prompt_longer_than_context(model):
    with pytest.raises(ValueError, match=f"tokens long; the model's context is {model.max_seq_len} tokens"):
        model.generate(None, ["red " * 2000], max_gen_len=4)


def test_normalise_inputs_forms():
    assert normalise_inputs({"image": "a.png"}) == {"image": (["a.png"], 1.0)}
    assert normalise_inputs({"audio": [("b.wav", 0.6)]}) == {"audio": (["b.wav"], 0.6)}
    assert normalise_inputs({"audio": (["b.wav"], 0.6)}) == {"audio": (["b.wav"], 0.6)}
    with pytest.raises(ValueError, match="sum to"):
        normalise_inputs({"image": ("a.png", 1.0), "audio": ("b.wav", -1.0)})


def test_base_model_mismatch_is_detected(tiny, tmp_path):
    # another tiny base with the same shapes but different weights (the 7B vs 7B_chinese trap)
    torch.manual_seed(123)
    from ibllm.models.llama import LLaMA

    cfg = llama_preset("tiny", vocab_size=VOCAB)
    other = tmp_path / "llama" / "other"
    save_meta_llama(cfg, {k: v for k, v in LLaMA(cfg).state_dict().items() if not k.endswith(".gate")}, other)
    shutil.copy(tiny["llama"].parent / "tokenizer.model", other.parent / "tokenizer.model")
    with pytest.raises(BaseModelMismatch, match="base model mismatch.*fingerprint"):
        ibllm.load(adapter=tiny["stage2"], llama=other)
    with pytest.warns(UserWarning, match="base model mismatch"):
        ibllm.load(adapter=tiny["stage2"], llama=other, check_base=False)


def test_fingerprint_ignores_storage_dtype(model):
    from ibllm import tuning

    fp = base_fingerprint(model.model)
    clone = type(model.model)(model.model.cfg, stage="finetune")
    clone.load_state_dict(model.model.state_dict(), strict=False)
    tuning.cast_frozen(clone, torch.bfloat16)
    assert base_fingerprint(clone) == fp


def test_official_files_load_for_inference_and_training(tiny, model, tmp_path):
    from ibllm.checkpoints.export import export_official
    from ibllm.lit import load_trainable
    from ibllm.models.ibllm import ImageBindLLM

    ad = read_adapter(tiny["stage2"])
    export_official(ad, tmp_path / "7B.pth", "finetune")
    export_official(ad, tmp_path / "7B-pretrained.pth", "pretrain")
    # strip our config entry: exactly what the official release holds
    for name in ("7B.pth", "7B-pretrained.pth"):
        raw = torch.load(tmp_path / name, weights_only=True)
        torch.save({"model": raw["model"]}, tmp_path / name)
    official = ibllm.load(adapter=tmp_path / "7B.pth", llama=tiny["llama"], imagebind=tiny["encoder"])
    assert official.model.stage == "finetune"
    tokens = torch.randint(3, VOCAB, (1, 9))
    visual = model.visual({"image": [str(tiny["image"])]})
    with torch.no_grad():
        assert torch.equal(official.model(tokens, visual=visual), model.model(tokens, visual=visual))
    stage1 = ibllm.load(adapter=tmp_path / "7B-pretrained.pth", llama=tiny["llama"], imagebind=tiny["encoder"])
    assert stage1.model.stage == "pretrain"
    # continue training: stage 2 starting from the official stage-1 file
    fresh = ImageBindLLM(model.model.cfg, stage="finetune")
    load_trainable(fresh, tmp_path / "7B-pretrained.pth")
    assert torch.equal(fresh.prefix_query.weight, model.model.prefix_query.weight)


def test_official_adapter_on_plain_7b_name_warns(tiny, tmp_path):
    from ibllm.checkpoints.export import export_official

    export_official(read_adapter(tiny["stage1"]), tmp_path / "a.pth", "pretrain")
    raw = torch.load(tmp_path / "a.pth", weights_only=True)
    torch.save({"model": raw["model"]}, tmp_path / "a.pth")
    seven = tmp_path / "llama" / "7B"
    shutil.copytree(tiny["llama"], seven)
    shutil.copy(tiny["llama"].parent / "tokenizer.model", seven.parent / "tokenizer.model")
    with pytest.warns(UserWarning, match="Open-Chinese-LLaMA"):
        ibllm.load(adapter=tmp_path / "a.pth", llama=seven)


def test_incremental_decoder_keeps_multibyte_characters():
    class ByteTok:
        eos_id = 0

        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    text = "héllo 日本"
    dec = IncrementalDecoder(ByteTok())
    pieces = [dec.push(b) for b in text.encode()]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_merge_keeps_outputs(tiny, model):
    merged = ibllm.load(adapter=tiny["stage2"], merge=True)
    tokens = torch.randint(3, VOCAB, (2, 11))
    visual = model.visual({"image": [str(tiny["image"])] * 2})
    with torch.no_grad():
        torch.testing.assert_close(merged.model(tokens, visual=visual), model.model(tokens, visual=visual),
                                   atol=1e-5, rtol=1e-5)


def test_missing_adapter_is_clear(tiny):
    with pytest.raises(CheckpointError, match="not found"):
        ibllm.load(adapter=tiny["root"] / "nope.ckpt")


def test_infer_huge_and_point_bind_from_shapes(tmp_path):
    """A few small tensors with the huge layout's shapes suffice to tell huge from huge_w3d (Point-Bind)."""
    from ibllm.models.imagebind import imagebind_summary

    def small(preset, modalities, n=6):
        shapes = imagebind_summary(preset, modalities)["shapes"]
        keys = sorted((k for k in shapes if np.prod(shapes[k]) <= 4096), key=lambda k: k)[:n]
        return {k: torch.zeros(shapes[k]) for k in keys}

    save_atomic(small("huge", ["vision"]), tmp_path / "h.safetensors")
    assert infer_imagebind(tmp_path / "h.safetensors") == ("huge", ["vision"])
    save_atomic({**small("huge", ["vision"]), **small("huge_w3d", ["point"])}, tmp_path / "w3d.safetensors")
    assert infer_imagebind(tmp_path / "w3d.safetensors") == ("huge_w3d", ["point", "vision"])
