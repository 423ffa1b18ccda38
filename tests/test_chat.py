"""The chat session and the chat / generate command lines, driven through stdin on a tiny saved model."""

from __future__ import annotations

import json

import pytest

import ibllm
from ibllm.processing.samples import conversation_prompt_ids
from test_inference import make_tiny_project


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sp_model):
    return make_tiny_project(tmp_path_factory.mktemp("tiny_chat"), sp_model, seed=5)


@pytest.fixture(scope="module")
def model(tiny):
    return ibllm.load(adapter=tiny["stage2"])


def test_session_streams_and_keeps_history(model, tiny):
    session = model.session({"image": str(tiny["image"])})
    pieces: list[str] = []
    first = session.send("Which digit is this?", on_text=pieces.append, max_gen_len=12, temperature=0)
    assert len(pieces) > 1 and "".join(pieces).strip() == first  # streamed piece by piece
    ids, dropped = session.prompt_ids("and the colour?")
    assert dropped == 0 and ids == conversation_prompt_ids(model.tokenizer, [("Which digit is this?", first)],
                                                           "and the colour?")
    second = session.send("and the colour?", max_gen_len=6, temperature=0)
    assert session.history == [("Which digit is this?", first), ("and the colour?", second)]
    # the one-call API gives the same answer for the same history
    assert model.chat("and the colour?", [("Which digit is this?", first)], {"image": str(tiny["image"])},
                      max_gen_len=6, temperature=0) == second
    # bad inputs leave inputs and history as they were
    with pytest.raises(ValueError, match="file not found"):
        session.set_input("image", str(tiny["root"] / "nope.png"))
    with pytest.raises(ValueError, match="no 'depth' branch"):
        session.set_input("depth", str(tiny["image"]))
    assert list(session.inputs) == ["image"] and len(session.history) == 2
    session.reset()
    assert session.history == [] and list(session.inputs) == ["image"]


def test_long_history_drops_oldest_turns(model):
    session = model.session()
    session.history = [("red " * 60, "green " * 60)] * 6
    ids, dropped = session.prompt_ids("hello")
    assert dropped > 0 and len(ids) < model.max_seq_len
    with pytest.raises(ValueError, match="context"):
        session.prompt_ids("red " * 2000)


@pytest.mark.system
def test_chat_cli_through_stdin(tiny, run_ibllm):
    image, missing = str(tiny["image"]), str(tiny["root"] / "missing.png")
    script = "\n".join([
        "Which digit is this?",
        f"/image {missing}",          # bad path: one error line, session continues
        "/history",
        "/inputs",
        "what colour?",
        f"/audio {tiny['wav']} 0.5",
        "/inputs",
        "/bogus",
        "/history",
        "/reset",
        "/history",
        "/quit",
    ]) + "\n"
    proc = run_ibllm(["chat", "--adapter", str(tiny["stage2"]), "--image", image, "--max-gen-len", "6",
                      "--temperature", "0"], stdin=script, timeout=240)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err
    assert out.count("ibllm> ") >= 2
    assert f"error: image ('{missing}'): file not found" in err
    assert "unknown command /bogus" in err
    assert "(1 turns)" in out and "(2 turns)" in out and "(0 turns)" in out
    assert f"inputs: image={image} (1)" in out  # unchanged after the bad /image
    assert f"inputs: image={image} (1), audio={tiny['wav']} (0.5)" in out


@pytest.mark.system
def test_chat_cli_bad_startup_and_eof(tiny, run_ibllm):
    proc = run_ibllm(["chat", "--adapter", str(tiny["stage2"]), "--image", str(tiny["root"] / "nope.jpg"),
                      "--max-gen-len", "3"], stdin="hello\n", timeout=240)
    assert proc.returncode == 0
    assert "nope.jpg" in proc.stderr and "starting without inputs" in proc.stderr
    assert "ibllm> " in proc.stdout
    proc = run_ibllm(["chat", "--adapter", str(tiny["root"] / "nope.ckpt")], timeout=240)
    assert proc.returncode == 1 and proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1


@pytest.mark.system
def test_generate_cli_json(tiny, model, run_ibllm):
    proc = run_ibllm(["generate", "--adapter", str(tiny["stage2"]), "--image", str(tiny["image"]), "--audio",
                      str(tiny["wav"]), "--weights", "0.4,0.6", "--prompt", "Which digit is this?", "--prompt", "red",
                      "--max-gen-len", "5", "--temperature", "0", "--json"], timeout=240)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [r["prompt"] for r in report["results"]] == ["Which digit is this?", "red"]
    assert report["inputs"]["audio"]["weight"] == 0.6
    expected = model.generate({"image": [(str(tiny["image"]), 0.4)], "audio": [(str(tiny["wav"]), 0.6)]},
                              ["Which digit is this?", "red"], max_gen_len=5, temperature=0)
    assert [r["output"] for r in report["results"]] == expected
    bad = run_ibllm(["generate", "--adapter", str(tiny["stage2"]), "--image", str(tiny["image"]), "--weights", "0",
                     "--prompt", "x"], timeout=240)
    assert bad.returncode == 1 and "positive" in bad.stderr and bad.stderr.count("\n") == 1
