"""Take the README picture of the browser demo (docs/web-demo.png) from the trained demo model.

After ``make pretrain``, ``make finetune`` and ``make crossmodal`` (which builds the spoken-digit audio tower,
``data/demo/encoder_av.safetensors``, and the held-out spoken digits), run from the repository root::

    .venv/bin/python docs/capture_web_demo.py [--digit-index 0] [--clip NAME.wav]

It serves the demo model as ``make demo-web`` does (the audio-capable encoder instead of the image-only one,
greedy decoding), opens the page in headless Chromium (offline, as the browser tests drive it), asks about one
held-out handwritten digit, resets the conversation, asks about one held-out spoken digit (a voice training
never heard), and saves both pages one above the other. Every answer is printed with the reference digit; the
script fails when an answer names the wrong digit.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the browser tests' Chromium + server helpers

from browser_helpers import Server, start_chromium  # noqa: E402

from ibllm.atomic import write_bytes_atomic  # noqa: E402
from ibllm.demos.digits.captions import DIGIT_WORDS  # noqa: E402

# Two conversations (Reset between them): the demo model was tuned on one-input conversations whose first
# question asks which digit it is, so a second input is asked about in a fresh conversation.
IMAGE_QUESTIONS = ("Which digit is this?", "What is the digit plus one?")
SPEECH_QUESTIONS = ("Which digit is this?", "Is the digit even or odd?")
GAP = 12  # pixels of white between the two screenshots


def heldout_digit(shards: Path, index: int, out: Path) -> int:
    """Copy the ``index``-th held-out digit image (in shard order) to ``out``; returns its label."""
    seen = 0
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            names = sorted(n for n in tar.getnames() if n.endswith(".png"))
            if index < seen + len(names):
                name = names[index - seen]
                out.write_bytes(tar.extractfile(name).read())
                return int(json.load(tar.extractfile(name[:-4] + ".json"))["label"])
            seen += len(names)
    raise SystemExit(f"error: {shards} holds only {seen} held-out images")


def wait_for(predicate, timeout: float, what: str):
    """Poll ``predicate`` until it returns something true (or fail naming ``what``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - the page re-rendered between finding and reading an element
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"error: timed out waiting for {what}")


class Page:
    """The demo page in Chromium: upload, clear, ask."""

    def __init__(self, driver, url: str) -> None:
        self.d = driver
        self.d.get(url)
        wait_for(lambda: self.d.find_elements("css selector", "#ibllm-question textarea"), 120, "the page")

    def css(self, selector: str):
        return self.d.find_element("css selector", selector)

    def upload(self, modality: str, path: Path) -> None:
        self.css(f"#ibllm-{modality} input[type=file]").send_keys(str(path))
        wait_for(lambda: path.suffix in self.css(f"#ibllm-{modality}").text, 60, f"the {modality} upload")

    def clear(self, modality: str) -> None:
        self.css(f"#ibllm-{modality} button[aria-label='Clear']").click()
        wait_for(lambda: self.d.find_elements("css selector", f"#ibllm-{modality} input[type=file]"), 30,
                 f"the {modality} upload to clear")

    def answers(self) -> list[str]:
        return [e.get_attribute("textContent") for e in
                self.d.find_elements("css selector", "#ibllm-chat [data-testid=bot] .message-content")]

    def ask(self, question: str) -> str:
        before = len(self.answers())
        self.css("#ibllm-question textarea").send_keys(question)
        self.css("#ibllm-send").click()
        wait_for(lambda: len(self.answers()) > before, 120, "the answer to start")
        status = wait_for(lambda: (s := self.css("#ibllm-status").text.strip()).startswith(("done", "error")) and s,
                          600, "the answer to finish")
        if not status.startswith("done"):
            raise SystemExit(f"error: the page says {status!r}")
        return self.answers()[-1].strip()

    def screenshot(self, width: int) -> Image.Image:
        """The whole page (scrolled to the top, window as tall as the page) as an image."""
        self.d.set_window_size(width, 800)  # shorter than the page: scrollHeight is then the page's own height
        time.sleep(0.5)
        self.d.execute_script("window.scrollTo(0, 0); document.documentElement.style.overflow = 'hidden'")
        height = int(self.d.execute_script("return document.documentElement.scrollHeight"))
        self.d.set_window_size(width, min(height + 200, 2000))  # + the window's own chrome
        time.sleep(1.0)
        shot = Image.open(io.BytesIO(self.d.get_screenshot_as_png())).convert("RGB")
        return shot.crop((0, 0, shot.width, min(shot.height, height)))


def stacked_png(shots: list[Image.Image]) -> bytes:
    """The screenshots one above the other (GAP white pixels between them), as PNG bytes."""
    width = max(s.width for s in shots)
    out = Image.new("RGB", (width, sum(s.height for s in shots) + GAP * (len(shots) - 1)), (255, 255, 255))
    top = 0
    for shot in shots:
        out.paste(shot, (0, top))
        top += shot.height + GAP
    buf = io.BytesIO()
    out.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def check(answer: str, digit: int, what: str, strict: bool = True) -> None:
    """Print the answer beside its reference; fail (when ``strict``) when the first digit word it names is not
    ``digit``."""
    named = [w for w in answer.lower().replace(".", " ").replace(",", " ").split() if w in DIGIT_WORDS]
    ok = bool(named) and named[0] == DIGIT_WORDS[digit]
    print(f"{what} (reference: {DIGIT_WORDS[digit]}): {answer!r} -> {'correct' if ok else 'WRONG'}", flush=True)
    if strict and not ok:
        raise SystemExit(f"error: wrong answer for {what}")


def main() -> None:
    """Serve the demo model, hold both conversations in Chromium, save the two screenshots stacked."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="runs/demo_finetune/checkpoints/last.ckpt")
    parser.add_argument("--digit-index", type=int, default=0, help="which held-out image (shard order)")
    parser.add_argument("--clip", default="en-us_f4_s140_p35_3.wav",
                        help="a held-out spoken digit in data/demo/speech/heldout (label: the last number)")
    parser.add_argument("--cache", default="data/demo/cache", help="visual cache folder ('': none)")
    parser.add_argument("--out", default="docs/web-demo.png")
    parser.add_argument("--no-check", action="store_true", help="save the picture even after a wrong answer")
    parser.add_argument("--width", type=int, default=1400)
    args = parser.parse_args()

    demo = ROOT / "data" / "demo"
    clip = demo / "speech" / "heldout" / args.clip
    cache = ["--cache", str(ROOT / args.cache)] if args.cache else []
    for need in (ROOT / args.adapter, demo / "encoder_av.safetensors", clip, *(ROOT / c for c in cache[1:])):
        if not need.exists():
            raise SystemExit(f"error: {need} is missing: run make pretrain, make finetune and make crossmodal first")
    home = Path(tempfile.mkdtemp(prefix="ibllm-web-picture-"))
    try:
        image = home / "digit.png"
        image_digit = heldout_digit(demo / "shards" / "heldout", args.digit_index, image)
        spoken = home / "speech.wav"
        shutil.copyfile(clip, spoken)
        spoken_digit = int(clip.stem.rsplit("_", 1)[1])
        server = Server(["--adapter", str(ROOT / args.adapter), "--llama", "smollm2-135m-instruct",
                         "--imagebind", str(demo / "encoder_av.safetensors"), "--imagebind-preset", "demo",
                         *cache, "--temperature", "0"], home / "server", timeout=600)
        driver = start_chromium(home / "browser")
        try:
            driver.set_window_size(args.width, 1000)
            page = Page(driver, server.url)
            page.upload("image", image)
            wait_for(lambda: "<img" in page.css("#ibllm-image-preview").get_attribute("innerHTML"), 60,
                     "the thumbnail")
            for question in IMAGE_QUESTIONS:
                check(page.ask(question), image_digit, f"held-out image #{args.digit_index}: {question!r}",
                      not args.no_check)
            shots = [page.screenshot(args.width)]
            page.css("#ibllm-reset").click()
            wait_for(lambda: not page.answers(), 30, "the reset")
            page.clear("image")
            page.upload("audio", spoken)
            page.css("#ibllm-cache button.label-wrap").click()  # fold the (unchanged) cache settings away
            for question in SPEECH_QUESTIONS:
                check(page.ask(question), spoken_digit, f"spoken digit {args.clip}: {question!r}", not args.no_check)
            shots.append(page.screenshot(args.width))
            out = ROOT / args.out
            write_bytes_atomic(out, stacked_png(shots))
            print(f"wrote {out}", flush=True)
        finally:
            driver.quit()
            server.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
