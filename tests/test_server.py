"""The OpenAI-compatible HTTP API (``python -m ibllm serve --api``): the real ``openai`` client against the real
server (a subprocess on a free loopback port) on a tiny saved model. Greedy answers are compared with the same
request made through the Python API; concurrent clients must get the answers sequential ones get."""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import ibllm
from browser_helpers import free_port, offline_env
from ibllm.server.cli import build_parser, config_from_args, is_loopback
from ibllm.server.messages import map_messages, read_media_file
from ibllm.server.scheduler import OutputText
from ibllm.server.schemas import APIError, ServerConfig, parse_request
from test_inference import make_tiny_project
from conftest import random_visual_cache

openai = pytest.importorskip("openai", reason="the API tests need the 'dev' extra (pip install '.[dev]')")
httpx = pytest.importorskip("httpx")

KEY = "test-key"
Q1, Q2 = "Which digit is this?", "and the colour?"
GREEDY = dict(temperature=0.0, max_tokens=12)
QUESTIONS = ["Which digit is this?", "red circle", "blue square photo", "the image of a digit", "one two three",
             "Which digit is this? seven", "green", "a photo of nine"]


class ApiServer:
    """``python -m ibllm serve --api ARGS`` on a free port; stopped by :meth:`stop` (by its pid)."""

    def __init__(self, args: list[str], home: Path, timeout: float = 180.0) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "server.log"
        home.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "ibllm", "serve", "--api", *args, "--port", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=offline_env(home))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not answer within {timeout} s:\n{self.log()}")

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.base}/health", timeout=5) as r:
            return json.loads(r.read())

    def client(self, key: str = KEY, **kwargs) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0, **kwargs)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sp_model):
    return make_tiny_project(tmp_path_factory.mktemp("tiny_api"), sp_model, seed=7)


@pytest.fixture(scope="module")
def cache_dir(tiny) -> Path:
    """A small visual cache (40 random unit vectors of the tiny encoder's width)."""
    return random_visual_cache(tiny["root"] / "cache")


@pytest.fixture(scope="module")
def model(tiny, cache_dir):
    """The served model in this process, with the same visual cache (on by default, as in the server)."""
    return ibllm.load(adapter=tiny["stage2"], cache=cache_dir)


@pytest.fixture(scope="module")
def media(tiny) -> Path:
    """The server's media folder: the test image, plus a link that points outside it."""
    folder = tiny["root"] / "media"
    folder.mkdir(exist_ok=True)
    (folder / "digit.png").write_bytes(tiny["image"].read_bytes())
    if not (folder / "escape.png").exists():
        os.symlink(tiny["image"], folder / "escape.png")
    return folder


@pytest.fixture(scope="module")
def server(tiny, media, cache_dir, tmp_path_factory):
    srv = ApiServer(["--adapter", str(tiny["stage2"]), "--cache", str(cache_dir), "--media-dir", str(media),
                     "--max-body-mb", "1", "--api-key", KEY], tmp_path_factory.mktemp("api_home"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def slow_server(tiny, tmp_path_factory):
    """A server whose single queue slot holds a request for 4 s (batch window) and gives up after 2 s."""
    srv = ApiServer(["--adapter", str(tiny["stage2"]), "--max-batch", "2", "--max-queue", "1",
                     "--batch-window-ms", "4000", "--timeout", "2"], tmp_path_factory.mktemp("api_slow"))
    yield srv
    srv.stop()


def ask(client, messages, **kwargs):
    settings = {**GREEDY, **kwargs}
    return client.chat.completions.create(model="ibllm", messages=messages, **settings)


def user(text: str, *parts: dict) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}, *parts]}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(path: Path) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(path.read_bytes())}}


def audio_part(data: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": "wav"}}


def wav_part(path: Path) -> dict:
    return audio_part(path.read_bytes())


# ---- unit tests: mapping and text assembly (no server) -------------------------------------------------------


def test_output_text_holds_back_stop_prefixes_and_whitespace():
    out = OutputText(["STOP"])
    sent = [out.push(p) for p in ["  hello", " wor", "ld ", "ST", "OP and more"]]
    assert sent == ["hello", " wor", "ld", "", ""] and out.stopped and out.text == "hello world"
    out = OutputText([])
    assert "".join([out.push(" a "), out.push(" b "), out.flush()]) == "a  b"


def test_messages_map_onto_the_multi_turn_template():
    req = parse_request({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "user", "content": [{"type": "text", "text": "there"}]}, {"role": "assistant", "content": " yes "},
        {"role": "user", "content": "next"}]})
    history, question, media = map_messages(req, ServerConfig())
    assert history == [("Be brief.\n\nhi\nthere", "yes")] and question == "next" and media == {}
    for bad, needle in [([{"role": "assistant", "content": "x"}], "start with a user"),
                        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message"),
                        ([{"role": "tool", "content": "x"}], "messages.0.role")]:
        with pytest.raises(APIError, match=needle):
            map_messages(parse_request({"model": "m", "messages": bad}), ServerConfig())


def test_media_paths_stay_inside_the_media_folder(tmp_path):
    inside, outside = tmp_path / "media", tmp_path / "secret.txt"
    inside.mkdir()
    (inside / "ok.png").write_bytes(b"png")
    outside.write_text("secret")
    os.symlink(outside, inside / "link.png")
    config = ServerConfig(media_dir=inside.resolve())
    assert read_media_file("ok.png", config, "x") == b"png"
    assert read_media_file(f"file://{inside / 'ok.png'}", config, "x") == b"png"
    for ref in ["../secret.txt", str(outside), "link.png", f"file://{outside}", "/etc/passwd"]:
        with pytest.raises(APIError, match="outside the allowed media folder") as e:
            read_media_file(ref, config, "x")
        assert e.value.status == 403
    with pytest.raises(APIError, match="without --media-dir"):
        read_media_file("ok.png", ServerConfig(), "x")


def test_command_line_settings(tmp_path, monkeypatch):
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.20", "::", "example.org"]))
    monkeypatch.setenv("IBLLM_API_KEY", "from-env")
    config = config_from_args(build_parser().parse_args(["--media-dir", str(tmp_path), "--max-body-mb", "0.5"]))
    assert config.api_key == "from-env" and config.media_dir == tmp_path.resolve()
    assert config.max_body_bytes == 2**19 and config.max_tokens == 128
    with pytest.raises(ValueError, match="not a folder"):
        config_from_args(build_parser().parse_args(["--media-dir", str(tmp_path / "missing")]))


# ---- the real server ----------------------------------------------------------------------------------------


@pytest.mark.system
def test_models_health_and_api_key(server):
    health = server.health()  # no key needed
    assert health["status"] == "ok" and health["model"] == "ibllm"
    assert [m.id for m in server.client().models.list().data] == ["ibllm"]
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError, match="API key"):
            server.client(key=key or "none").models.list()


@pytest.mark.system
def test_one_shot_and_multi_turn_match_the_python_api(server, model):
    c = server.client()
    r = ask(c, [{"role": "user", "content": Q1}])
    expected = model.chat(Q1, temperature=0.0, max_gen_len=12)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    ids, _ = model.session().prompt_ids(Q1)
    assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids) + r.usage.completion_tokens
    assert 0 < r.usage.completion_tokens <= 12 and r.choices[0].finish_reason in ("stop", "length")
    r2 = ask(c, [{"role": "user", "content": Q1}, {"role": "assistant", "content": expected},
                 {"role": "user", "content": Q2}])
    assert r2.choices[0].message.content == model.chat(Q2, [(Q1, expected)], temperature=0.0, max_gen_len=12)
    r3 = ask(c, [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": Q1}])
    assert r3.choices[0].message.content == model.chat(f"Answer briefly.\n\n{Q1}", temperature=0.0, max_gen_len=12)


@pytest.mark.system
def test_sampling_seed_and_stop(server, model):
    c = server.client()
    msgs = [{"role": "user", "content": Q1}]
    a = ask(c, msgs, temperature=0.9, top_p=0.9, seed=5).choices[0].message.content
    assert a == ask(c, msgs, temperature=0.9, top_p=0.9, seed=5).choices[0].message.content
    assert a == model.chat(Q1, temperature=0.9, top_p=0.9, seed=5, max_gen_len=12)
    full = ask(c, msgs).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 2]
    r = ask(c, msgs, stop=[stop])
    assert r.choices[0].message.content == full[: full.find(stop)].rstrip() and r.choices[0].finish_reason == "stop"


@pytest.mark.system
def test_streaming_chunks_and_done(server, model):
    c = server.client()
    chunks = list(ask(c, [{"role": "user", "content": Q1}], stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == model.chat(Q1, temperature=0.0, max_gen_len=12)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    body = {"model": "ibllm", "messages": [{"role": "user", "content": Q1}], "stream": True, **GREEDY}
    raw = httpx.post(f"{server.base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                     timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


@pytest.mark.system
def test_image_and_audio_inputs(server, model, tiny, media):
    c = server.client()
    img, wav = tiny["image"], tiny["wav"]
    r = ask(c, [user(Q1, data_url(img))])
    assert r.choices[0].message.content == model.chat(Q1, inputs={"image": str(img)}, temperature=0.0, max_gen_len=12)
    by_path = ask(c, [user(Q1, {"type": "image_url", "image_url": {"url": "digit.png"}})])
    assert by_path.choices[0].message.content == r.choices[0].message.content
    r = ask(c, [user(Q1, wav_part(wav))])
    assert r.choices[0].message.content == model.chat(Q1, inputs={"audio": str(wav)}, temperature=0.0, max_gen_len=12)
    weights = {"image": 0.7, "audio": 0.3}
    mixed = ask(c, [user(Q1, data_url(img), wav_part(wav))], extra_body={"modality_weights": weights})
    inputs = {"image": (str(img), 0.7), "audio": (str(wav), 0.3)}
    assert mixed.choices[0].message.content == model.chat(Q1, inputs=inputs, temperature=0.0, max_gen_len=12)
    # the extension field: the same image as an `inputs` item; a later turn's image replaces an earlier one
    ext = ask(c, [{"role": "user", "content": Q1}], extra_body={"inputs": [
        {"modality": "image", "data": b64(img.read_bytes())}]})
    assert ext.choices[0].message.content == ask(c, [user(Q1, data_url(img))]).choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="no point encoder"):
        ask(c, [{"role": "user", "content": Q1}], extra_body={"inputs": [{"modality": "point", "data": "AAAA"}]})


@pytest.mark.system
def test_visual_cache_switch_and_constants(server, model, tiny):
    c, img = server.client(), str(tiny["image"])
    off = ask(c, [user(Q1, data_url(tiny["image"]))], extra_body={"visual_cache": {"enabled": False}})
    assert off.choices[0].message.content == model.session({"image": img}, cache=None).send(Q1, temperature=0.0,
                                                                                            max_gen_len=12)
    tuned = copy.copy(model.cache)
    tuned.k, tuned.weight = 3, 0.9
    on = ask(c, [user(Q1, data_url(tiny["image"]))], extra_body={"visual_cache": {"k": 3, "weight": 0.9}})
    assert on.choices[0].message.content == model.session({"image": img}, cache=tuned).send(Q1, temperature=0.0,
                                                                                           max_gen_len=12)


@pytest.mark.system
def test_concurrent_clients_get_the_sequential_answers(server):
    c = server.client()
    msgs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    sequential = [ask(c, m).choices[0].message.content for m in msgs]
    barrier = threading.Barrier(len(msgs))

    def one(m):
        barrier.wait()
        return ask(server.client(), m).choices[0].message.content

    with ThreadPoolExecutor(len(msgs)) as pool:
        concurrent = list(pool.map(one, msgs))
    assert concurrent == sequential
    assert server.health()["largest_batch"] >= 2  # they did decode together


@pytest.mark.system
def test_bad_requests_get_openai_errors(server, tiny):
    c = server.client()
    msgs = [{"role": "user", "content": Q1}]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server.base}/v1/chat/completions", content=b'{"model": "ibllm", "messages": [', headers=headers)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="gpt-4o", messages=msgs)
    cases = [
        ([user(Q1, {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(b"not an image")}})], {},
         "undecodable image"),
        ([user(Q1, audio_part(b"noise" * 20))], {}, "undecodable audio"),
        ([user(Q1, audio_part(b"RIFF\0\0\0\0WAVEjunkjunk"))], {}, "undecodable audio"),
        ([user(Q1, {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}})], {}, "not valid base64"),
        ([user(Q1, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})], {},
         "remote URLs are not fetched"),
        ([{"role": "user", "content": "one two three " * 200}], {}, "context is 512 tokens"),
        (msgs, {"max_tokens": 1000}, "max_tokens is 1000"),
        (msgs, {"n": 2}, "'n' is not supported"),
        (msgs + [{"role": "assistant", "content": "x"}], {}, "last message must be from the user"),
        (msgs, {"temperature": -1}, "temperature"),
        ([user(Q1, {"type": "file", "file": {}})], {}, "messages.0.content.1: Input tag 'file'"),
        ([user(Q1, data_url(tiny["image"]))], {"extra_body": {"visual_cache": {"k": 0}}}, "visual_cache.k"),
    ]
    for messages, extra, needle in cases:
        with pytest.raises(openai.BadRequestError, match=needle):
            ask(c, messages, **extra)
    try:
        ask(c, [{"role": "user", "content": "one two three " * 200}])
    except openai.BadRequestError as e:
        assert e.code == "context_length_exceeded"
    for url in ["../a.png", str(tiny["image"]), "escape.png", "file:///etc/passwd"]:
        with pytest.raises(openai.PermissionDeniedError, match="outside the allowed media folder"):
            ask(c, [user(Q1, {"type": "image_url", "image_url": {"url": url}})])
    with pytest.raises(openai.APIStatusError, match="limit") as e:
        ask(c, [{"role": "user", "content": "x" * (1 << 20)}])
    assert e.value.status_code == 413
    assert ask(c, msgs).choices[0].message.content  # still serving


@pytest.mark.system
def test_full_queue_timeout_and_disconnect(slow_server, tiny):
    c = slow_server.client()
    msgs = [{"role": "user", "content": Q1}]
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(lambda: ask(c, msgs))  # waits in the queue (4 s window), times out at 2 s
        wait_until(lambda: slow_server.health()["queued"] == 1, 10, "the first request to queue")
        with pytest.raises(openai.RateLimitError, match="busy"):
            ask(c, msgs)
        with pytest.raises(openai.APIStatusError, match="timeout") as e:
            first.result()
    assert e.value.status_code == 504
    wait_until(lambda: slow_server.health()["timed_out"] == 1, 10, "the timed-out job to be dropped")
    # a client that gives up while its request waits: the job is cancelled, not run
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{slow_server.base}/v1/chat/completions", json={"model": "ibllm", "messages": msgs}, timeout=0.5)
    wait_until(lambda: slow_server.health()["cancelled"] == 1, 1.4, "the abandoned request to be cancelled")
    h = slow_server.health()
    assert h["timed_out"] == 1 and h["completed"] == 0 and h["queued"] == 0
    with pytest.raises(openai.BadRequestError, match="without --media-dir"):
        ask(c, [user(Q1, {"type": "image_url", "image_url": {"url": "a.png"}})])
    with pytest.raises(openai.BadRequestError, match="no visual cache is loaded"):
        ask(c, [user(Q1, data_url(tiny["image"]))], extra_body={"visual_cache": {"enabled": True}})


@pytest.mark.system
def test_disconnect_mid_stream_stops_generation(server):
    before = server.health()
    c = server.client()
    stream = ask(c, [{"role": "user", "content": Q1}], max_tokens=380, stream=True)
    pieces = []
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content)
        if len(pieces) == 3:
            break
    stream.close()
    health = wait_until(lambda: (h := server.health())["running"] == 0 and h, 30, "the generation to stop")
    assert health["cancelled"] == before["cancelled"] + 1 and health["completed"] == before["completed"]
