"""Prompt templates and the project's multi-turn chat template.

Single turn (exactly the official Alpaca strings): the answer is appended directly after
``### Response:`` with no space or newline.

Multi-turn (our own definition, used by :func:`format_conversation`). For turns
``(u_1, a_1), ..., (u_n, a_n)`` the conversation text is::

    HEADER + "### Instruction:\\n{u_1}\\n\\n### Response:" + a_1
           + "\\n\\n### Instruction:\\n{u_2}\\n\\n### Response:" + a_2
           + ...

where ``HEADER`` is the no-input Alpaca preamble (``CHAT_HEADER``). The first turn therefore is
character-for-character ``format_prompt(u_1) + a_1``, so a one-turn conversation equals an official
stage-2 sample. During tokenisation (``samples.build_conversation_sample``) every turn's
``prompt_part + answer_part`` is encoded as one unit and followed by EOS; only the first turn
gets BOS.
"""

from __future__ import annotations

from typing import Optional, Sequence

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
CAPTION_INSTRUCTION = "Generate caption of this image"

CHAT_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
CHAT_TURN = "### Instruction:\n{user}\n\n### Response:"
CHAT_TURN_SEPARATOR = "\n\n"

IMAGE_PLACEHOLDER = "<image>"


def format_prompt(instruction: str, input: Optional[str] = None) -> str:
    """Format an Alpaca prompt: the no-input template when ``input`` is None or "", else the input template."""
    if input is None or input == "":
        return PROMPT_NO_INPUT.format(instruction=instruction)
    return PROMPT_INPUT.format(instruction=instruction, input=input)


def caption_prompt() -> str:
    """The stage-1 prompt: the no-input template with instruction ``Generate caption of this image``."""
    return format_prompt(CAPTION_INSTRUCTION)


def format_conversation(
    turns: Sequence[tuple[str, str]], first_input: Optional[str] = None
) -> list[tuple[str, str]]:
    """Split a conversation into ``(prompt_part, answer_part)`` pieces per the module's chat template.

    Args:
        turns: ``[(user, assistant), ...]``; at least one turn.
        first_input: optional Alpaca ``input`` for the first turn (uses the input template for turn 1).

    Returns:
        One ``(prompt_part, answer_part)`` per turn. Concatenating all parts in order gives the full
        conversation text; only ``answer_part`` pieces are trained on.
    """
    if not turns:
        raise ValueError("a conversation needs at least one (user, assistant) turn")
    parts: list[tuple[str, str]] = []
    for i, (user, assistant) in enumerate(turns):
        if i == 0:
            prompt = format_prompt(user, first_input)
        else:
            prompt = CHAT_TURN_SEPARATOR + CHAT_TURN.format(user=user)
        parts.append((prompt, assistant))
    return parts


def strip_image_placeholder(text: str) -> str:
    """Remove the LLaVA ``<image>`` placeholder and the newline that usually surrounds it."""
    if IMAGE_PLACEHOLDER not in text:
        return text
    out = text.replace(IMAGE_PLACEHOLDER + "\n", "").replace("\n" + IMAGE_PLACEHOLDER, "")
    return out.replace(IMAGE_PLACEHOLDER, "").strip()
