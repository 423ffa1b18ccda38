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

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ibllm.api import MEDIA, ChatSession
from ibllm.cli.common import (LOAD_ALIASES, RECOVERABLE, InputOptions, ModelOptions, SamplingOptions, chosen_inputs,
                              fail, load_model, one_line)
from ibllm.processing import MediaError
from ibllm.verbs.registry import run, verb

USER_PROMPT = "you> "
BOT_PREFIX = "ibllm> "
HELP = """commands:
  /image PATH [WEIGHT]   set the image input (also /video /audio /point /depth /thermal /imu)
  /text WORDS            add a text input (ImageBind text branch)
  /drop MODALITY         remove one input        /noinputs   remove all inputs
  /inputs                show the inputs         /history    show the conversation
  /reset                 forget the conversation (inputs are kept)
  /help                  this help               /quit       leave (also Ctrl-D)"""


def run_chat(session: ChatSession, sampling: SamplingOptions, stdin: Any = None, out: Any = None) -> None:
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
                         max_gen_len=sampling.max_gen_len, temperature=sampling.temperature, top_p=sampling.top_p,
                         seed=sampling.seed)
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
    p = Path(path).expanduser()
    if not p.exists():
        raise MediaError(modality, path, "file not found")
    if p.is_dir():
        raise MediaError(modality, path, "is a directory, expected a file")


@verb("chat", flat=("model", "inputs", "sampling"), aliases=LOAD_ALIASES, description=__doc__)
def chat(model: ModelOptions = ModelOptions(), inputs: InputOptions = InputOptions(),
         sampling: SamplingOptions = SamplingOptions(), argv: Sequence[str] = ()) -> None:
    """Interactive multi-turn chat with streaming: load the model, set the start-up inputs, read–answer loop.

    Args:
        model: which model to load (options --adapter, --llama, ...)
        inputs: the start-up inputs (--image, --audio, ..., --weights)
        sampling: decoding settings
        argv: the command line as typed (the order of the input options)
    """
    try:
        chosen = chosen_inputs(inputs, argv)
        loaded = load_model(model)
    except RECOVERABLE as e:
        fail(e)
    session = ChatSession(loaded)
    try:
        session.set_inputs(chosen)
    except RECOVERABLE as e:  # bad start-up input: report it, chat without it
        print(f"error: {one_line(e)} (starting without inputs)", file=sys.stderr, flush=True)
    run_chat(session, sampling)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm chat``: interactive multi-turn chat with streaming."""
    run("chat", argv)
