"""File-level multimodal encoding, the inspect command, and the real GGUF model through our decoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from ibllm.build import build_model, load_tokenizer_for
from ibllm.cli import main
from ibllm.config import imagebind_preset, llama_preset
from ibllm.generation import generate_tokens
from ibllm.models.ibllm import ImageBindLLM, mix_embeddings
from ibllm.models.imagebind import build_imagebind
from ibllm.processing import MediaError, load_modality


@pytest.fixture(scope="module")
def tiny_model() -> ImageBindLLM:
    torch.manual_seed(0)
    encoder = build_imagebind(imagebind_preset("tiny"), modalities=["vision", "audio", "text"])
    return ImageBindLLM(llama_preset("tiny"), stage="finetune", encoder=encoder)


def test_encode_files_with_weights(tmp_path, tiny_model):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    soundfile.write(tmp_path / "b.wav", np.sin(np.linspace(0, 800, 16000 * 3)).astype("float32"), 16000)
    mixed = tiny_model.encode({"image": [str(tmp_path / "a.png")], "audio": ([str(tmp_path / "b.wav")], 0.6)})
    image = tiny_model.image_bind({"vision": load_modality("image", [tmp_path / "a.png"])})["vision"]
    audio = tiny_model.image_bind({"audio": load_modality("audio", [tmp_path / "b.wav"])})["audio"]
    torch.testing.assert_close(mixed, mix_embeddings([image, audio], [1.0, 0.6]))
    assert mixed.shape == (1, 32)


def test_encode_names_the_bad_file(tmp_path, tiny_model):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(MediaError, match="bad.png"):
        tiny_model.encode({"image": [str(tmp_path / "bad.png")]})


def test_inspect_7b_counts(capsys):
    main(["inspect", "--preset", "7B", "--stage", "pretrain", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["llm"]["parameters"]["trainable"] == 608_322_560
    main(["inspect", "--preset", "7B", "--stage", "finetune"])
    assert "41,340,928" in capsys.readouterr().out


def test_inspect_imagebind_huge_key_count(capsys):
    main(["inspect", "--imagebind", "huge", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert len(report["imagebind"]["keys"]) == 1311
    main(["inspect", "--imagebind", "huge", "--modalities", "vision", "--json"])
    vision = json.loads(capsys.readouterr().out)["imagebind"]
    assert all(k.split(".")[1] == "vision" for k in vision["keys"])


@pytest.mark.system
def test_module_help_runs(run_ibllm):
    out = run_ibllm(["--help"], check=True, timeout=300).stdout
    assert "inspect" in out and "fit" in out


def test_smollm2_gguf_says_paris():
    """Acceptance: the real SmolLM2-135M-Instruct GGUF through our own decoder completes the sentence."""
    model = build_model("smollm2-135m-instruct", "finetune", imagebind=None, modalities=()).eval()
    tok = load_tokenizer_for("smollm2-135m-instruct")
    ids = tok.encode("The capital of France is", bos=True, eos=False)
    out = generate_tokens(model, [ids], None, max_gen_len=4, temperature=0, eos_id=tok.eos_id)[0]
    assert tok.decode(out).strip().startswith("Paris")
