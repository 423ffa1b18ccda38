"""Multi-turn chat sessions and the ``chat`` / ``generate`` command lines.

Conversation template
---------------------
The chat uses the same multi-turn template stage 2 trains with (:mod:`ibllm.processing.templates`,
:func:`~ibllm.processing.samples.conversation_prompt_ids`). For completed turns ``(u_1, a_1) ... (u_n, a_n)``
and the new message ``u`` the model sees::

    <bos>HEADER "### Instruction:\\n{u_1}\\n\\n### Response:" a_1 <eos>
         "\\n\\n### Instruction:\\n{u_2}\\n\\n### Response:" a_2 <eos>
         ...
         "\\n\\n### Instruction:\\n{u}\\n\\n### Response:"

where ``HEADER`` is the no-input Alpaca preamble, so the first turn is exactly the official single-turn
prompt. Each earlier turn is tokenised as ``prompt + answer`` followed by EOS. The current inputs (image,
audio, ...) are mixed into one visual token that conditions the whole conversation; changing them with
``/image PATH`` etc. applies from the next answer on, with the history kept. When the history no longer
fits the context, the oldest turns are dropped (and a note is printed).

Commands inside the chat::

    /image PATH [WEIGHT]   set the image (likewise /video /audio /point /depth /thermal /imu)
    /text WORDS            add a text input to the mix (ImageBind text branch)
    /drop MODALITY         remove one input;  /noinputs  remove all
    /inputs                show the current inputs;  /history  show the conversation
    /reset                 forget the conversation (inputs are kept)
    /help, /quit

Every bad input (missing or unreadable file, unsupported extension, a modality the encoder lacks, weights
that do not sum to a positive number, a message longer than the context) prints one ``error: ...`` line;
the session keeps its history and inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

MEDIA = ("image", "video", "audio", "point", "depth", "thermal", "imu", "text")
USER_PROMPT = "you> "
BOT_PREFIX = "ibllm> "
HELP = """commands:
  /image PATH [WEIGHT]   set the image input (also /video /audio /point /depth /thermal /imu)
  /text WORDS            add a text input (ImageBind text branch)
  /drop MODALITY         remove one input        /noinputs   remove all inputs
  /inputs                show the inputs         /history    show the conversation
  /reset                 forget the conversation (inputs are kept)
  /help                  this help               /quit       leave (also Ctrl-D)"""


class ChatSession:
    """A conversation with an :class:`ibllm.inference.InferenceModel`: history, inputs and streaming.

    ``inputs`` maps a modality to ``(item, weight)`` (one item per modality; see
    :meth:`InferenceModel.encode` for the accepted forms). The visual token is recomputed only when the
    inputs change.
    """

    def __init__(self, model: Any, inputs: Mapping[str, Any] | None = None, cache: Any = "default") -> None:
        self.model = model
        self.cache = cache
        self.history: list[tuple[str, str]] = []
        self.inputs: dict[str, tuple[Any, float]] = {}
        self._visual = None
        if inputs:
            self.set_inputs(inputs)

    # ---- inputs --------------------------------------------------------------------------------
    def set_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Replace all inputs; on any error the previous inputs stay in place."""
        from ibllm.inference import normalise_inputs

        normalised = normalise_inputs(inputs)
        visual = self.model.visual(normalised, self.cache) if normalised else None
        self.inputs = {m: (items[0] if isinstance(items, list) and len(items) == 1 else items, w)
                       for m, (items, w) in normalised.items()}
        self._visual = visual

    def set_input(self, modality: str, item: Any, weight: float | None = None) -> None:
        """Set (or replace) one modality's input; the others keep theirs."""
        new = dict(self.inputs)
        old_weight = new.get(modality, (None, 1.0))[1]
        new[modality] = (item, float(weight) if weight is not None else old_weight)
        self.set_inputs(new)

    def drop_input(self, modality: str) -> None:
        """Remove one modality's input (error when there is none)."""
        if modality not in self.inputs:
            raise ValueError(f"no {modality} input to drop (inputs: {', '.join(self.inputs) or 'none'})")
        new = dict(self.inputs)
        del new[modality]
        self.set_inputs(new)

    def reset(self) -> None:
        """Forget the conversation; inputs are kept."""
        self.history = []

    def describe_inputs(self) -> str:
        """``image=a.png (1.0), audio=b.wav (0.6)`` or ``none``."""
        return ", ".join(f"{m}={item} ({w:g})" for m, (item, w) in self.inputs.items()) or "none"

    # ---- turns ---------------------------------------------------------------------------------
    def prompt_ids(self, message: str) -> tuple[list[int], int]:
        """Ids for the next answer and how many of the oldest turns had to be dropped to fit the context."""
        from ibllm.processing.samples import conversation_prompt_ids

        tok = self.model.tokenizer
        limit = self.model.max_seq_len - 1
        for dropped in range(len(self.history) + 1):
            ids = conversation_prompt_ids(tok, self.history[dropped:], message)
            if len(ids) < limit:
                return ids, dropped
        self.model.check_length(ids, "the message")
        return ids, len(self.history)

    def send(self, message: str, on_text: Callable[[str], None] | None = None, max_gen_len: int = 256,
             temperature: float = 0.1, top_p: float = 0.75, seed: int | None = None) -> str:
        """Answer ``message``; ``on_text`` receives the answer piece by piece as it is generated.

        The turn is added to the history only when generation completes.
        """
        if not message.strip():
            raise ValueError("empty message")
        ids, dropped = self.prompt_ids(message)
        if dropped:
            self.history = self.history[dropped:]
        pieces = []
        for piece in self.model.stream_text(ids, self._visual, max_gen_len=max_gen_len, temperature=temperature,
                                            top_p=top_p, seed=seed):
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
        reply = "".join(pieces).strip()
        self.history.append((message, reply))
        return reply


# --------------------------------------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------------------------------------


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ibllm.load`` options shared by ``chat`` and ``generate``."""
    g = parser.add_argument_group("model")
    g.add_argument("--adapter", help="our checkpoint / .safetensors export, an official 7B.pth or "
                                     "7B-pretrained.pth, or a merged export folder")
    g.add_argument("--llama", "--llm", dest="llama", help="base LLaMA: Meta/HF folder, GGUF file, "
                                                         "smollm2-135m-instruct (default: recorded in the adapter)")
    g.add_argument("--tokenizer", help="tokenizer file (default: the base model's)")
    g.add_argument("--imagebind", help="ImageBind weights (imagebind_huge.pth / imagebind_w3D.pth layout)")
    g.add_argument("--imagebind-preset", help="skip the encoder preset guess (huge, huge_w3d, demo, tiny)")
    g.add_argument("--cache", help="visual cache index (cache-enhanced inputs, SPEC §6.1)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    g.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the adapter's)")
    g.add_argument("--merge", action="store_true", help="fold LoRA into the base weights (faster decoding)")
    g.add_argument("--no-check-base", action="store_true", help="warn instead of failing on a base-model mismatch")
    m = parser.add_argument_group("inputs")
    for name in MEDIA:
        m.add_argument(f"--{name}", help=f"{name} input" + (" (a string)" if name == "text" else " file"))
    m.add_argument("--weights", help="comma-separated modality weights, in the order the input flags were given")
    s = parser.add_argument_group("sampling")
    s.add_argument("--max-gen-len", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.1)
    s.add_argument("--top-p", type=float, default=0.75)
    s.add_argument("--seed", type=int, default=None)


def inputs_from_args(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, tuple[str, float]]:
    """``{modality: (item, weight)}`` from the input flags; ``--weights`` follow the flags' order in ``argv``."""
    order: list[str] = []
    for token in argv:
        name = token[2:].split("=", 1)[0] if token.startswith("--") else None
        if name in MEDIA and getattr(args, name) is not None and name not in order:
            order.append(name)
    weights = [1.0] * len(order)
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise ValueError(f"--weights {args.weights!r}: expected comma-separated numbers") from None
        if len(weights) != len(order):
            raise ValueError(f"--weights has {len(weights)} values for {len(order)} inputs ({', '.join(order)})")
    return {name: (getattr(args, name), w) for name, w in zip(order, weights)}


def load_from_args(args: argparse.Namespace) -> Any:
    """``ibllm.load`` with the parsed options."""
    from ibllm.inference import load

    return load(adapter=args.adapter, llama=args.llama, tokenizer=args.tokenizer, imagebind=args.imagebind,
                cache=args.cache, device=args.device, dtype=args.dtype, imagebind_preset=args.imagebind_preset,
                max_seq_len=args.max_seq_len, check_base=not args.no_check_base, merge=args.merge)


def one_line(err: BaseException) -> str:
    """An exception as one line."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text


def _fail(err: BaseException) -> None:
    print(f"error: {one_line(err)}", file=sys.stderr)
    raise SystemExit(1)


RECOVERABLE = (ValueError, OSError, RuntimeError, KeyError)


def run_chat(session: ChatSession, args: argparse.Namespace, stdin: Any = None, out: Any = None) -> None:
    """The read–answer loop: commands, streaming output, errors that never end the session."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    print(f"ImageBind-LLM chat — inputs: {session.describe_inputs()}. /help for commands, /quit to leave.",
          file=out, flush=True)
    while True:
        try:
            if interactive:
                line = input(USER_PROMPT)
            else:
                print(USER_PROMPT, end="", file=out, flush=True)
                line = stdin.readline()
                if not line:
                    raise EOFError
        except EOFError:
            print(file=out)
            return
        except KeyboardInterrupt:
            print(file=out)
            continue
        line = line.strip()
        if not line:
            continue
        replying = False
        try:
            if line.startswith("/"):
                if handle_command(session, line, out) == "quit":
                    return
                continue
            print(BOT_PREFIX, end="", file=out, flush=True)
            replying = True
            session.send(line, on_text=lambda piece: print(piece, end="", file=out, flush=True),
                         max_gen_len=args.max_gen_len, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
            print(file=out, flush=True)
        except KeyboardInterrupt:
            print("\n[interrupted; the turn was not added to the history]", file=out, flush=True)
        except RECOVERABLE as e:
            if replying:
                print(file=out, flush=True)
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)


def handle_command(session: ChatSession, line: str, out: Any) -> str | None:
    """Run one ``/command``; returns ``"quit"`` to end the chat. Errors are raised to the loop."""
    cmd, _, rest = line[1:].partition(" ")
    cmd, rest = cmd.lower(), rest.strip()
    if cmd in ("quit", "exit", "q"):
        return "quit"
    if cmd == "help":
        print(HELP, file=out, flush=True)
    elif cmd == "reset":
        session.reset()
        print("(conversation cleared; inputs kept: " + session.describe_inputs() + ")", file=out, flush=True)
    elif cmd == "inputs":
        print("inputs: " + session.describe_inputs(), file=out, flush=True)
    elif cmd == "history":
        for user, reply in session.history:
            print(f"{USER_PROMPT}{user}\n{BOT_PREFIX}{reply}", file=out)
        print(f"({len(session.history)} turns)", file=out, flush=True)
    elif cmd == "noinputs":
        session.set_inputs({})
        print("inputs: none", file=out, flush=True)
    elif cmd == "drop":
        session.drop_input(rest)
        print("inputs: " + session.describe_inputs(), file=out, flush=True)
    elif cmd == "text":
        if not rest:
            raise ValueError("/text needs some words")
        session.set_input("text", rest)
        print("inputs: " + session.describe_inputs(), file=out, flush=True)
    elif cmd in MEDIA:
        if not rest:
            raise ValueError(f"/{cmd} needs a file path")
        path, weight = rest, None
        head, _, tail = rest.rpartition(" ")
        if head:
            try:
                weight = float(tail)
                path = head
            except ValueError:
                pass
        _check_file(cmd, path)
        session.set_input(cmd, path, weight)
        print("inputs: " + session.describe_inputs(), file=out, flush=True)
    else:
        raise ValueError(f"unknown command /{cmd} (try /help)")
    return None


def _check_file(modality: str, path: str) -> None:
    from pathlib import Path

    from ibllm.processing import MediaError

    p = Path(path).expanduser()
    if not p.exists():
        raise MediaError(modality, path, "file not found")
    if p.is_dir():
        raise MediaError(modality, path, "is a directory, expected a file")


def build_chat_parser() -> argparse.ArgumentParser:
    """Parser of ``python -m ibllm chat``."""
    parser = argparse.ArgumentParser(prog="python -m ibllm chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm chat``: interactive multi-turn chat with streaming."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_chat_parser().parse_args(argv)
    try:
        inputs = inputs_from_args(args, argv)
        model = load_from_args(args)
    except RECOVERABLE as e:
        _fail(e)
    session = ChatSession(model)
    try:
        session.set_inputs(inputs)
    except RECOVERABLE as e:  # bad start-up input: report it, chat without it
        print(f"error: {one_line(e)} (starting without inputs)", file=sys.stderr, flush=True)
    run_chat(session, args)


def build_generate_parser() -> argparse.ArgumentParser:
    """Parser of ``python -m ibllm generate``."""
    parser = argparse.ArgumentParser(
        prog="python -m ibllm generate",
        description="One-shot generation: every --prompt (or line of --prompts-file, '-' = stdin) is answered "
                    "in one batch, conditioned on the inputs. Prompts are wrapped in the Alpaca instruction "
                    "template unless --raw.")
    add_load_arguments(parser)
    p = parser.add_argument_group("prompts and output")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable: one batch)")
    p.add_argument("--prompts-file", help="one prompt per line ('-' reads stdin)")
    p.add_argument("--raw", action="store_true", help="send prompts as they are (already templated)")
    p.add_argument("--json", action="store_true", help="print one JSON object (prompts, outputs, settings, timing)")
    return parser


def generate_main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm generate``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_generate_parser()
    args = parser.parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        from pathlib import Path

        try:
            text = sys.stdin.read() if args.prompts_file == "-" else Path(args.prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            _fail(e)
        prompts += [ln for ln in text.splitlines() if ln.strip()]
    if not prompts:
        parser.error("give at least one --prompt (or --prompts-file)")
    try:
        inputs = inputs_from_args(args, argv)
        t0 = time.perf_counter()
        model = load_from_args(args)
        t1 = time.perf_counter()
        outputs = model.generate(inputs or None, prompts, max_gen_len=args.max_gen_len, temperature=args.temperature,
                                 top_p=args.top_p, template=not args.raw, seed=args.seed)
        t2 = time.perf_counter()
    except RECOVERABLE as e:
        _fail(e)
    if args.json:
        report = {"results": [{"prompt": p, "output": o} for p, o in zip(prompts, outputs)],
                  "inputs": {m: {"item": str(item), "weight": w} for m, (item, w) in inputs.items()},
                  "settings": {"max_gen_len": args.max_gen_len, "temperature": args.temperature,
                               "top_p": args.top_p, "seed": args.seed, "template": not args.raw},
                  "model": {k: v for k, v in model.info.items() if isinstance(v, (str, int, float, bool, type(None)))},
                  "timing_s": {"load": round(t1 - t0, 3), "generate": round(t2 - t1, 3)}}
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        for i, out in enumerate(outputs):
            if len(outputs) > 1:
                print(f"[{i}] ", end="")
            print(out)
