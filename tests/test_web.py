"""The browser demo (``python -m ibllm serve``): a real server on a tiny saved model, driven by headless
Chromium (Selenium, system chromedriver) and by ``gradio_client`` — no mocks. Answers are compared with the
same request made through the Python API (greedy decoding)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

import ibllm
from browser_helpers import Server, foreign_urls, requested_urls
from test_inference import make_tiny_project
from conftest import random_visual_cache

pytest.importorskip("gradio", reason="the web demo needs the 'web' extra (pip install '.[web]')")

# A real server subprocess; the browser fixture (headless Chromium) comes from conftest.py.
pytestmark = pytest.mark.system

Q1, Q2 = "Which digit is this?", "and the colour?"
GEN = dict(max_gen_len=24, temperature=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sp_model):
    return make_tiny_project(tmp_path_factory.mktemp("tiny_web"), sp_model, seed=7)


@pytest.fixture(scope="module")
def cache_dir(tiny) -> Path:
    """A small visual cache (40 random unit vectors of the tiny encoder's width)."""
    return random_visual_cache(tiny["root"] / "cache")


@pytest.fixture(scope="module")
def model(tiny):
    return ibllm.load(adapter=tiny["stage2"])


@pytest.fixture(scope="module")
def server(tiny, cache_dir, tmp_path_factory):
    srv = Server(["--adapter", str(tiny["stage2"]), "--cache", str(cache_dir)], tmp_path_factory.mktemp("srv_home"))
    yield srv
    srv.stop()


# ---- page helpers ------------------------------------------------------------------------------------------


def css(d, selector):
    from selenium.webdriver.common.by import By

    return d.find_element(By.CSS_SELECTOR, selector)


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except StaleElementReferenceException:  # the page re-rendered between finding and reading an element
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


def open_page(d, url: str) -> None:
    d.get(url)
    wait_for(lambda: d.find_elements("css selector", "#ibllm-question textarea"), what="the page")


def upload(d, modality: str, path: Path) -> None:
    css(d, f"#ibllm-{modality} input[type=file]").send_keys(str(path))
    wait_for(lambda: (t := css(d, f"#ibllm-{modality}").text) and path.suffix in t and "Drop File" not in t,
             what=f"the {modality} upload")  # narrow boxes show the name truncated: wait for its suffix


def clear_upload(d, modality: str) -> None:
    css(d, f"#ibllm-{modality} button[aria-label='Clear']").click()
    wait_for(lambda: d.find_elements("css selector", f"#ibllm-{modality} input[type=file]")
             and "Drop File" in css(d, f"#ibllm-{modality}").text, what=f"the {modality} upload to clear")


def preview(d) -> str:
    """The image thumbnail area's HTML (an <img> with a data: URL, or a note)."""
    return css(d, "#ibllm-image-preview").get_attribute("innerHTML")


def set_number(d, elem: str, value: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = wait_for(lambda: d.find_elements("css selector", f"#{elem} input[type=number]"), timeout=20,
                   what=f"{elem} to show")[0]
    box.clear()
    box.send_keys(value, Keys.TAB)
    wait_for(lambda: float(css(d, f"#{elem} input[type=range]").get_attribute("value")) == float(value),
             what=f"{elem} = {value}")


def status(d) -> str:
    return css(d, "#ibllm-status").text.strip()


def bot_messages(d) -> list[str]:
    # textContent: the exact text (Selenium's .text folds runs of spaces as the layout shows them)
    return [e.get_attribute("textContent") for e in
            d.find_elements("css selector", "#ibllm-chat [data-testid=bot] .message-content")]


def ask(d, question: str | None) -> str:
    """Type a question (None: send what the box holds), send it, wait for the streamed answer to end;
    returns the status line it ended with."""
    before = len(bot_messages(d))
    if question is not None:
        css(d, "#ibllm-question textarea").send_keys(question)
    css(d, "#ibllm-send").click()
    wait_for(lambda: status(d).startswith("generating") or status(d).startswith("error")
             or len(bot_messages(d)) > before, timeout=30, what="the request to start")
    return wait_for(lambda: (s := status(d)) and (s.startswith("done") or s.startswith("error")) and s,
                    timeout=120, what="the answer to finish")


# ---- tests -------------------------------------------------------------------------------------------------


def test_browser_chat_matches_python_api(server, browser, tiny, model, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    d = browser
    open_page(d, server.url)
    assert "ImageBind-LLM" in d.title
    upload(d, "image", tiny["image"])
    wait_for(lambda: "data:image/png;base64," in preview(d), what="the image thumbnail")
    upload(d, "audio", tiny["wav"])
    # move the audio weight slider with the mouse; the page shows the value it landed on
    slider = css(d, "#ibllm-audio-weight input[type=range]")
    ActionChains(d).drag_and_drop_by_offset(slider, -slider.size["width"] // 4, 0).perform()
    weight = float(css(d, "#ibllm-audio-weight input[type=number]").get_attribute("value"))
    assert 0.05 <= weight <= 0.6
    # the server was started with a cache: it is on by default; switch it off
    cache_box = css(d, "#ibllm-cache-on input[type=checkbox]")
    assert cache_box.is_selected()
    cache_box.click()
    wait_for(lambda: not cache_box.is_selected(), what="the cache switch")
    css(d, "#ibllm-generation button.label-wrap").click()
    set_number(d, "ibllm-temperature", "0")
    set_number(d, "ibllm-max-len", str(GEN["max_gen_len"]))

    done = ask(d, Q1)
    assert done.startswith("done"), done
    assert f"audio ({weight:g})" in done
    inputs = {"image": (str(tiny["image"]), 1.0), "audio": (str(tiny["wav"]), weight)}
    expected1 = model.session(inputs, cache=None).send(Q1, **GEN)
    assert bot_messages(d)[-1] == expected1 and expected1
    # a second turn continues the conversation
    assert ask(d, Q2).startswith("done")
    expected2 = model.chat(Q2, [(Q1, expected1)], inputs, **GEN)
    assert bot_messages(d) == [expected1, expected2]

    d.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "ibllm-web-demo.png"
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    css(d, "#ibllm-reset").click()
    wait_for(lambda: not bot_messages(d) and "cleared" in status(d), what="the reset")
    # offline: every request the page made went to this server
    assert foreign_urls(requested_urls(d)) == []


def test_browser_bad_upload_then_success(server, browser, tiny, model, cache_dir, tmp_path):
    from ibllm.cache import load_cache

    d = browser
    open_page(d, server.url)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    upload(d, "image", broken)
    wait_for(lambda: "no preview of broken.png" in preview(d), what="the thumbnail's note")
    css(d, "#ibllm-generation button.label-wrap").click()
    set_number(d, "ibllm-temperature", "0")
    set_number(d, "ibllm-max-len", str(GEN["max_gen_len"]))
    err = ask(d, Q1)
    assert err.startswith("error:") and "broken.png" in err and "image" in err, err
    assert bot_messages(d) == []
    assert css(d, "#ibllm-question textarea").get_attribute("value") == Q1  # the question is kept
    # the server keeps serving: replace the file and ask again
    clear_upload(d, "image")
    wait_for(lambda: "no preview" not in preview(d), what="the note to go")
    upload(d, "image", tiny["image"])
    wait_for(lambda: "<img" in preview(d), what="the image thumbnail")
    done = ask(d, None)  # the kept question, sent again
    assert done.startswith("done") and "inputs: image (1)" in done, done
    # the cache is on by default here (k 10, temperature 20, weight 0.5: the official demo's values)
    expected = model.session({"image": str(tiny["image"])}, cache=load_cache(cache_dir)).send(Q1, **GEN)
    assert bot_messages(d) == [expected]
    assert foreign_urls(requested_urls(d)) == []


def _api_args(question, history=(), image=None, image_w=1.0, audio=None, audio_w=1.0, point=None, point_w=1.0,
              cache=False, k=10, cache_t=20.0, cache_w=0.5, max_gen_len=24, temperature=0.0, top_p=0.75, seed=-1):
    from gradio_client import handle_file

    f = lambda p: handle_file(str(p)) if p is not None else None  # noqa: E731
    return (question, [list(t) for t in history], f(image), image_w, f(audio), audio_w, None, 1.0, f(point), point_w,
            cache, k, cache_t, cache_w, max_gen_len, temperature, top_p, seed)


def test_api_client_streams_same_answer(server, tiny, model, cache_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from ibllm.cache import load_cache

    client = Client(server.url, verbose=False, download_files=False)
    job = client.submit(*_api_args(Q1, image=tiny["image"], audio=tiny["wav"], audio_w=0.5, cache=True, k=5),
                        api_name="/answer")
    final = job.result(timeout=120)
    streamed = job.outputs()
    cache = load_cache(cache_dir, k=5, temperature=20.0, weight=0.5)
    inputs = {"image": (str(tiny["image"]), 1.0), "audio": (str(tiny["wav"]), 0.5)}
    assert final == model.session(inputs, cache=cache).send(Q1, **GEN)
    assert len(streamed) > 2 and streamed[-1] == final  # streamed piece by piece
    assert all(final.startswith(s.strip()) for s in streamed[:-1] if s.strip())
    # the cache changes the answer's conditioning: with it off the answer is the plain one
    plain = client.predict(*_api_args(Q1, image=tiny["image"], audio=tiny["wav"], audio_w=0.5), api_name="/answer")
    assert plain == model.session(inputs, cache=None).send(Q1, **GEN)
    # multi-turn through the API
    second = client.predict(*_api_args(Q2, [(Q1, plain)], image=tiny["image"], audio=tiny["wav"], audio_w=0.5),
                            api_name="/answer")
    assert second == model.chat(Q2, [(Q1, plain)], inputs, **GEN)

    # bad requests: one clear message each, and the server keeps serving
    with pytest.raises(AppError, match="positive"):
        client.predict(*_api_args(Q1, image=tiny["image"], image_w=0.0), api_name="/answer")
    with pytest.raises(AppError, match="no 'point' branch"):
        point = tiny["root"] / "cloud.npy"
        np.save(point, np.random.default_rng(0).standard_normal((64, 3)).astype("float32"))
        client.predict(*_api_args(Q1, point=point), api_name="/answer")
    assert client.predict(*_api_args(Q1, image=tiny["image"]), api_name="/answer") == \
        model.session({"image": str(tiny["image"])}, cache=None).send(Q1, **GEN)


def test_api_queue_one_at_a_time_and_stop(server, tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from gradio_client import Client
    from gradio_client.utils import Status

    client = Client(server.url, verbose=False, download_files=False)
    # three long answers keep the single generation slot busy, so the next request must queue
    first, *others = [client.submit(*_api_args(Q1, image=tiny["image"], max_gen_len=400), api_name="/answer")
                      for _ in range(3)]
    wait_for(lambda: first.outputs(), timeout=60, what="the first answer to stream")
    second = client.submit(*_api_args(Q1, image=tiny["image"]), api_name="/answer")
    # while earlier ones generate, it waits in the queue (with its position) and gets nothing
    seen = wait_for(lambda: (s := second.status()).code == Status.IN_QUEUE and s, timeout=30,
                    what=lambda: f"the queued state (now {second.status().code})")
    assert seen.rank is not None and not second.outputs(), seen
    streamed_before_stop = len(first.outputs())
    assert first.cancel()  # Stop: the long answer ends early ...
    assert isinstance(second.result(timeout=120), str)  # ... and the queued request is answered
    wait_for(lambda: first.done(), timeout=30, what="the first job to end")
    assert first.status().code == Status.CANCELLED
    assert len(first.outputs()) < 400 and streamed_before_stop > 0
    assert server.proc.poll() is None


def test_browser_queue_position_and_stop(server, browser, tiny):
    from gradio_client import Client

    d = browser
    open_page(d, server.url)
    upload(d, "image", tiny["image"])
    css(d, "#ibllm-generation button.label-wrap").click()
    set_number(d, "ibllm-temperature", "0")
    set_number(d, "ibllm-max-len", "480")
    # others' long answers are being generated: this page's request waits and shows its position
    client = Client(server.url, verbose=False, download_files=False)
    others = [client.submit(*_api_args(Q1, image=tiny["image"], max_gen_len=480), api_name="/answer")
              for _ in range(3)]
    wait_for(lambda: others[0].outputs(), timeout=60, what="the other answers to stream")
    css(d, "#ibllm-question textarea").send_keys(Q1)
    css(d, "#ibllm-send").click()
    shown = wait_for(lambda: "queue" in (s := status(d)) and s, timeout=30,
                     what=lambda: f"the queue position (status {status(d)!r}, others done "
                                  f"{[o.done() for o in others]})")
    assert re.search(r"queue: [1-3]/[1-3]", shown), shown
    for other in others:
        other.cancel()
    # our answer starts streaming once the slot is free; Stop ends it early
    wait_for(lambda: bot_messages(d) and len(bot_messages(d)[-1]) > 20, timeout=60, what="our answer to stream")
    css(d, "#ibllm-stop").click()
    wait_for(lambda: status(d).startswith("stopped"), timeout=20,
             what=lambda: f"the stop (status {status(d)!r}, answer {len(bot_messages(d)[-1])} chars)")
    partial = bot_messages(d)[-1]
    time.sleep(0.5)
    assert bot_messages(d)[-1] == partial  # nothing more arrives
    assert server.proc.poll() is None
