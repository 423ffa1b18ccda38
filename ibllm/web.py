"""Browser demo: ``python -m ibllm serve`` — multimodal chat with streaming answers (gradio).

A page where a person uploads any mix of image, audio, video and point-cloud files with one weight each
(the embeddings are mixed into one visual token by those weights; an uploaded image shows as a thumbnail), switches the visual cache on or off
and sets its k / temperature / weight, asks questions in a multi-turn conversation (with a reset) and watches each answer stream in.
Generation settings (max length, temperature, top-p, seed) sit beside the chat.

Everything runs through the inference API (:func:`ibllm.load`, :meth:`InferenceModel.visual`,
:meth:`InferenceModel.stream_text`, :meth:`ChatSession.prompt_ids`): a question asked here with greedy
settings gets exactly the answer ``model.chat(question, history, inputs, temperature=0)`` gives.

Serving
-------
* One generation at a time: every generating event shares one queue slot (``concurrency_id``); other
  requests wait in gradio's queue and their page shows the queue position. The Stop button cancels the
  running answer (the turn is then not kept in the conversation).
* Bad requests (an unreadable file, a modality the encoder lacks, weights summing to zero, a question
  longer than the context) are shown on the page as one ``error: ...`` line; the server keeps serving.
* Uploads: at most ``MAX_UPLOAD_SIZE`` per file (larger ones are refused by the server); a browser
  session's uploads are deleted when its tab is closed or reloaded, uploads older than ``UPLOAD_MAX_AGE_S``
  (API clients have no session end) hourly, and all of them when the server stops. Each file's decoding is
  bounded by the limits of ``ibllm.processing`` (pixels, duration, frames, points).
* Offline by construction: bound to 127.0.0.1 unless ``--host`` says otherwise, no share links, gradio's
  analytics and version check off (``GRADIO_ANALYTICS_ENABLED=False``), no server-side rendering, a
  theme with local/system fonts only; the page's scripts, styles and fonts all come from this server.

API
---
Besides the page, the endpoint ``/answer`` streams the (accumulated) answer text for scripts, e.g. with
``gradio_client``: ``Client(url).submit(question, history, image, image_weight, audio, audio_weight,
video, video_weight, point, point_weight, use_cache, cache_k, cache_temperature, cache_weight,
max_gen_len, temperature, top_p, seed, api_name="/answer")`` (files via ``gradio_client.handle_file``;
``history`` is a list of ``[user, assistant]`` pairs). Errors come back as the client's ``AppError``.
"""

from __future__ import annotations

import copy
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ibllm.api import normalise_inputs
from ibllm.cli.common import LOAD_ALIASES, RECOVERABLE, ModelOptions, SamplingOptions, fail, load_model, one_line
from ibllm.verbs.registry import run, verb
from ibllm.web_preview import image_thumbnail_html
from ibllm.web_uploads import delete_on_session_end

# Offline by construction: set before gradio (and huggingface_hub) are imported.
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "GRADIO_SSR_MODE": "False", "GRADIO_SHARE": "False", "DO_NOT_TRACK": "1"}

# Modalities offered on the page: (modality, label, accepted extensions for the hint).
WEB_MODALITIES: tuple[tuple[str, str, str], ...] = (
    ("image", "Image", ".png .jpg .jpeg .bmp .webp"),
    ("audio", "Audio", ".wav .flac .ogg .mp3 .m4a"),
    ("video", "Video", ".mp4 .webm .mov .avi .mkv"),
    ("point", "Point cloud", ".ply .npy .pt .xyz .pcd .obj"),
)
BRANCH = {"image": "vision", "video": "vision", "audio": "audio", "point": "point"}
CONCURRENCY_ID = "generate"
MAX_UPLOAD_SIZE = "100mb"  # per file; gradio refuses larger uploads
UPLOAD_MAX_AGE_S = 6 * 3600  # uploads older than this are deleted (hourly sweep), all of them at shutdown
# The official demo's defaults (generation) and the visual cache's constants.
DEFAULTS = {"max_gen_len": 128, "temperature": 0.1, "top_p": 0.75, "weight": 1.0, "cache_k": 10,
            "cache_temperature": 20.0, "cache_weight": 0.5}


def set_offline_env() -> None:
    """Switch off gradio's analytics / version check, hub access and share links (unless set already)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


# --------------------------------------------------------------------------------------------------------
# The engine: requests -> streamed answers (no gradio here)
# --------------------------------------------------------------------------------------------------------


@dataclass
class CacheSettings:
    """Visual-cache switch and its constants (neighbours k, softmax temperature, mixing weight) for one request."""

    enabled: bool = False
    k: int = DEFAULTS["cache_k"]
    temperature: float = DEFAULTS["cache_temperature"]
    weight: float = DEFAULTS["cache_weight"]


@dataclass
class GenerationSettings:
    """Sampling settings for one answer (temperature 0 = greedy)."""

    max_gen_len: int = DEFAULTS["max_gen_len"]
    temperature: float = DEFAULTS["temperature"]
    top_p: float = DEFAULTS["top_p"]
    seed: int | None = None


class ChatEngine:
    """Answers chat requests from the web page / API with a shared :class:`~ibllm.api.InferenceModel`.

    Stateless per request (the conversation comes with the request), so any number of browser sessions
    can use one engine; a lock makes sure only one generation runs at a time even outside gradio's queue.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.lock = threading.Lock()

    @property
    def has_cache(self) -> bool:
        """True when the model was loaded with a visual cache."""
        return self.model.cache is not None

    def available(self, modality: str) -> bool:
        """Whether the loaded encoder has the branch ``modality`` needs."""
        return BRANCH.get(modality, modality) in self.model.modalities

    def build_inputs(self, files: Mapping[str, str | None], weights: Mapping[str, float]) -> dict[str, tuple[str, float]]:
        """``{modality: (file, weight)}`` of the uploaded files (empty uploads are left out)."""
        out: dict[str, tuple[str, float]] = {}
        for modality, path in files.items():
            if path:
                out[modality] = (str(path), float(weights.get(modality, 1.0)))
        return out

    def cache_for(self, settings: CacheSettings) -> Any:
        """The cache object to encode with: None when off, else a copy of the model's cache with the
        request's k / temperature / weight (the shared cache is never modified)."""
        if not settings.enabled:
            return None
        if self.model.cache is None:
            raise ValueError("no visual cache is loaded (start the server with --cache PATH)")
        cache = copy.copy(self.model.cache)
        cache.k = int(settings.k)
        cache.temperature = float(settings.temperature)
        cache.weight = float(settings.weight)
        if not 0.0 <= cache.weight <= 1.0:
            raise ValueError(f"cache weight must be within [0, 1], got {cache.weight:g}")
        return cache

    def stream(self, question: str, history: Sequence[Sequence[str]], inputs: Mapping[str, tuple[str, float]],
               cache: CacheSettings | None = None, gen: GenerationSettings | None = None) -> Iterator[str]:
        """Yield the answer so far (accumulated text) to ``question`` after ``history`` given ``inputs``.

        The last value is the stripped final answer. Raises ``ValueError`` / ``OSError`` for bad requests
        (before any text is produced).
        """
        cache, gen = cache or CacheSettings(), gen or GenerationSettings()
        if not question or not question.strip():
            raise ValueError("type a question first")
        if gen.max_gen_len < 1:
            raise ValueError(f"max length must be at least 1, got {gen.max_gen_len}")
        if not 0.0 < gen.top_p <= 1.0:
            raise ValueError(f"top-p must be within (0, 1], got {gen.top_p:g}")
        if gen.temperature < 0:
            raise ValueError(f"temperature must not be negative, got {gen.temperature:g}")
        with self.lock:
            session = self.model.session(cache=None)
            session.history = [(str(u), str(a)) for u, a in history]
            ids, _dropped = session.prompt_ids(question)
            normalised = normalise_inputs(inputs) if inputs else {}
            visual = self.model.visual(normalised, self.cache_for(cache)) if normalised else None
            text = ""
            for piece in self.model.stream_text(ids, visual, max_gen_len=int(gen.max_gen_len),
                                                temperature=float(gen.temperature), top_p=float(gen.top_p),
                                                seed=gen.seed):
                text += piece
                yield text
            yield text.strip()


def error_line(err: BaseException, uploads: Mapping[str, str] | None = None) -> str:
    """``error: ...`` in one line; gradio's upload folders are shortened to the uploaded file's name."""
    text = one_line(err)
    for path in (uploads or {}).values():
        if path and str(path) in text:
            text = text.replace(str(path), Path(path).name)
    return f"error: {text}"


# --------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------

CSS = """
#ibllm-status {min-height: 2.2em}
#ibllm-status.error, #ibllm-status .error {color: #b91c1c}
.ibllm-thumb img {display: block; margin: 6px auto; image-rendering: pixelated; border: 1px solid #d4d4d8}
.ibllm-thumb-note {margin: 6px; font-size: 0.85em; color: #71717a}
"""


def _messages(history: Sequence[Sequence[str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for user, reply in history:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return out


def build_app(engine: ChatEngine, title: str = "ImageBind-LLM", gen: GenerationSettings | None = None) -> Any:
    """The gradio ``Blocks`` of the demo (queue configured: one generation at a time); ``gen`` sets the
    generation controls' initial values."""
    set_offline_env()
    gen = gen or GenerationSettings()
    import gradio as gr

    info = engine.model.info
    described = ", ".join(f"{k}={Path(str(v)).name}" for k, v in info.items()
                          if k in ("adapter", "llm", "imagebind") and v) or "base model"
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, UPLOAD_MAX_AGE_S)) as app:
        gr.Markdown(f"## {title}\nUpload any mix of image, audio, video and point-cloud files, set one weight "
                    f"per input, then ask. <small>model: {described}; encoder branches: "
                    f"{', '.join(engine.model.modalities) or 'none'}</small>")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=2, min_width=300):
                files, weights = {}, {}
                for row in (WEB_MODALITIES[:2], WEB_MODALITIES[2:]):
                    with gr.Row(equal_height=True):
                        for modality, label, exts in row:
                            note = "" if engine.available(modality) else " (not in this model)"
                            with gr.Column(min_width=150), gr.Group():
                                files[modality] = gr.File(label=f"{label}{note}", type="filepath", height=120,
                                                          elem_id=f"ibllm-{modality}")
                                if modality == "image":  # a thumbnail of the uploaded image
                                    preview = gr.HTML("", elem_id="ibllm-image-preview", padding=False)
                                weights[modality] = gr.Slider(0.0, 1.0, value=DEFAULTS["weight"], step=0.05,
                                                              label=f"{label} weight", info=exts,
                                                              elem_id=f"ibllm-{modality}-weight")
                with gr.Accordion("Visual cache", open=engine.has_cache, elem_id="ibllm-cache"):
                    use_cache = gr.Checkbox(value=engine.has_cache, label="use the visual cache",
                                            interactive=engine.has_cache, elem_id="ibllm-cache-on",
                                            info=None if engine.has_cache else "no cache loaded (--cache PATH)")
                    cache_k = gr.Slider(1, 64, value=DEFAULTS["cache_k"], step=1, label="k (neighbours)",
                                        elem_id="ibllm-cache-k")
                    cache_t = gr.Slider(0.0, 100.0, value=DEFAULTS["cache_temperature"], step=0.5,
                                        label="temperature", elem_id="ibllm-cache-t")
                    cache_w = gr.Slider(0.0, 1.0, value=DEFAULTS["cache_weight"], step=0.05, label="weight",
                                        elem_id="ibllm-cache-w")
                with gr.Accordion("Generation", open=False, elem_id="ibllm-generation"):
                    max_len = gr.Slider(1, max(1, engine.model.max_seq_len - 1),
                                        value=min(gen.max_gen_len, max(1, engine.model.max_seq_len - 1)),
                                        step=1, label="max length (tokens)", elem_id="ibllm-max-len")
                    temperature = gr.Slider(0.0, 2.0, value=gen.temperature, step=0.05,
                                            label="temperature (0 = greedy)", elem_id="ibllm-temperature")
                    top_p = gr.Slider(0.05, 1.0, value=gen.top_p, step=0.05, label="top-p",
                                      elem_id="ibllm-top-p")
                    seed = gr.Number(value=-1 if gen.seed is None else gen.seed, precision=0,
                                     label="seed (-1 = random)", elem_id="ibllm-seed")
            with gr.Column(scale=3, min_width=360):
                chatbot = gr.Chatbot(label="Conversation", height=560, render_markdown=False,
                                     elem_id="ibllm-chat", feedback_options=None, buttons=["copy"])
                question = gr.Textbox(label="Question", placeholder="Ask about the inputs… (Enter sends)",
                                      lines=1, elem_id="ibllm-question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="ibllm-send")
                    stop = gr.Button("Stop", variant="stop", elem_id="ibllm-stop")
                    reset = gr.Button("Reset conversation", elem_id="ibllm-reset")
                status = gr.Markdown("", elem_id="ibllm-status")
        # Hidden API-only components (the /answer endpoint).
        api_history = gr.JSON(value=[], visible=False)
        api_answer = gr.Textbox(visible=False)
        api_button = gr.Button(visible=False)

        modality_names = [m for m, _, _ in WEB_MODALITIES]
        media = [c for m in modality_names for c in (files[m], weights[m])]
        settings = [use_cache, cache_k, cache_t, cache_w, max_len, temperature, top_p, seed]

        def parse(values: Sequence[Any]) -> tuple[dict[str, tuple[str, float]], dict[str, str], CacheSettings,
                                                  GenerationSettings]:
            media_values, rest = values[: 2 * len(modality_names)], values[2 * len(modality_names):]
            uploads = {m: media_values[2 * i] for i, m in enumerate(modality_names) if media_values[2 * i]}
            w = {m: float(media_values[2 * i + 1]) for i, m in enumerate(modality_names)}
            on, k, ct, cw, n, t, p, s = rest
            inputs = engine.build_inputs(uploads, w)
            cache = CacheSettings(bool(on), int(k), float(ct), float(cw))
            gen = GenerationSettings(int(n), float(t), float(p), None if s is None or s == "" or int(s) < 0 else int(s))
            return inputs, uploads, cache, gen

        def respond(message: str, turns: list[tuple[str, str]], *values: Any) -> Iterator[tuple[Any, ...]]:
            turns = [tuple(t) for t in (turns or [])]
            inputs, uploads, cache, gen = parse(values)
            shown = _messages(turns) + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
            started = time.perf_counter()
            answer = ""
            stream = engine.stream(message, turns, inputs, cache, gen)
            try:
                yield shown, turns, "_generating…_", ""
                for answer in stream:
                    shown[-1] = {"role": "assistant", "content": answer}
                    yield shown, gr.skip(), gr.skip(), gr.skip()  # status untouched: Stop may have written it
            except Exception as e:  # noqa: BLE001 - every request error is shown; the server keeps serving
                yield _messages(turns), turns, error_line(e, uploads), message
                return
            finally:  # Stop closes this generator: end the model's stream now (releases the engine's lock)
                stream.close()
            turns = turns + [(message, answer)]
            used = ", ".join(f"{m} ({w:g})" for m, (_, w) in inputs.items()) or "no inputs"
            yield shown, turns, f"done in {time.perf_counter() - started:.1f} s — inputs: {used}", gr.skip()

        def answer_api(message: str, pairs: Any, *values: Any) -> Iterator[str]:
            inputs, uploads, cache, gen = parse(values)
            turns = [(str(u), str(a)) for u, a in (pairs or [])]
            stream = engine.stream(message, turns, inputs, cache, gen)
            try:
                yield from stream
            except (ValueError, OSError, RuntimeError, KeyError) as e:
                raise gr.Error(error_line(e, uploads).removeprefix("error: "), print_exception=False) from None
            finally:
                stream.close()

        def on_reset() -> tuple[Any, ...]:
            return [], [], "conversation cleared (inputs kept)"

        def on_stop() -> str:
            return "stopped — the unfinished answer is not kept in the conversation"

        chat_inputs = [question, history, *media, *settings]
        chat_outputs = [chatbot, history, status, question]
        common = dict(concurrency_id=CONCURRENCY_ID, concurrency_limit=1, show_progress="full",
                      show_progress_on=[status])
        ev_send = send.click(respond, chat_inputs, chat_outputs, api_visibility="private", **common)
        ev_submit = question.submit(respond, chat_inputs, chat_outputs, api_visibility="private", **common)
        ev_api = api_button.click(answer_api, [question, api_history, *media, *settings], api_answer,
                                  api_name="answer", concurrency_id=CONCURRENCY_ID, concurrency_limit=1)
        stop.click(on_stop, None, status, cancels=[ev_send, ev_submit, ev_api], queue=False,
                   api_visibility="private")
        reset.click(on_reset, None, [chatbot, history, status], cancels=[ev_send, ev_submit], queue=False,
                    api_visibility="private")
        chatbot.clear(lambda: ([], "conversation cleared (inputs kept)"), None, [history, status], queue=False,
                      api_visibility="private")  # the chat box's own trash button forgets the history too
        files["image"].change(image_thumbnail_html, files["image"], preview, queue=False, api_visibility="private")
        app.uploads = delete_on_session_end(app, files.values())  # deleted when the tab closes
    app.queue(default_concurrency_limit=1, max_size=64)
    return app


def launch(app: Any, host: str = "127.0.0.1", port: int = 7860, quiet: bool = False,
           block: bool = True) -> tuple[Any, str]:
    """Serve ``app`` locally: no share link, no SSR, no MCP, no PWA; returns ``(app, local_url)``."""
    set_offline_env()
    import gradio as gr

    theme = gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"),
                              font_mono=("ui-monospace", "monospace"))
    _, local_url, _ = app.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                                 prevent_thread_lock=True, quiet=quiet, ssr_mode=False, mcp_server=False,
                                 pwa=False, show_error=True, theme=theme, css=CSS, footer_links=["api"],
                                 enable_monitoring=False, max_file_size=MAX_UPLOAD_SIZE)
    print(f"ibllm web demo on {local_url} (Ctrl-C stops)", flush=True)
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            app.close()
    return app, local_url


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


@verb("serve", flat=("model", "sampling"), aliases=LOAD_ALIASES, description=__doc__,
      epilog="--api: serve the OpenAI-compatible HTTP API instead of the page (its own options: "
             "python -m ibllm serve --api --help)")
def serve(model: ModelOptions = ModelOptions(),
          sampling: SamplingOptions = SamplingOptions(max_gen_len=DEFAULTS["max_gen_len"]),
          host: str = "127.0.0.1", port: int = 7860, title: str = "ImageBind-LLM") -> None:
    """Serve the browser demo until Ctrl-C (sampling defaults: the page's, the official demo's).

    Args:
        model: which model to load (as for ``python -m ibllm chat``)
        sampling: the page's initial generation settings
        host: address to bind (default 127.0.0.1: this machine only)
        port: port of the page
        title: page title
    """
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the web demo needs gradio: pip install 'ibllm[web]'", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        loaded = load_model(model)
    except RECOVERABLE as e:
        fail(e)
    gen = GenerationSettings(sampling.max_gen_len, sampling.temperature, sampling.top_p, sampling.seed)
    app = build_app(ChatEngine(loaded), title=title, gen=gen)
    launch(app, host, port)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm serve``: the browser demo (``--api``: the HTTP API, :mod:`ibllm.server.cli`)."""
    set_offline_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--api" in argv:
        from ibllm.server.cli import main as api_main  # fastapi/torch: only for the API server

        api_main([a for a in argv if a != "--api"])
        return
    run("serve", argv)
