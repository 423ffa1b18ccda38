"""Autoregressive generation: one batched, KV-cached kernel and one text wrapper over it.

:func:`stream_tokens` is the kernel: greedy (temperature 0) or temperature + top-p sampling, where top-p
keeps the smallest prefix of the sorted distribution whose mass reaches p. Prompts of different lengths
are batched the official way: one buffer ``[B,T]``, every row decodes the same position at each step, and
a row whose prompt is longer than the shortest keeps its own prompt token at that position instead of the
sampled one. Unlike the official loop, every row stops at its own EOS and the whole batch stops once all
rows have. The visual adapter is projected once per request. :func:`generate_tokens` collects the
kernel's ids per row; :func:`stream_text` turns one row's ids into text pieces as they arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ibllm.models.ibllm import ImageBindLLM
from ibllm.models.packed import enable_packed_linears


def sample_top_p(probs: Tensor, top_p: float, generator: torch.Generator | None = None) -> Tensor:
    """Sample one id per row of ``probs [B,V]`` from the smallest prefix of the sorted distribution whose
    mass reaches ``top_p``: a token is dropped when the cumulative mass *before* it exceeds ``top_p``."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before > top_p, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(-1, keepdim=True)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def next_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None) -> Tensor:
    """``logits [B,V]`` -> ids ``[B]``: argmax when ``temperature <= 0``, else softmax(l/T) then top-p."""
    if temperature <= 0:
        return logits.argmax(-1)
    return sample_top_p(torch.softmax(logits.float() / temperature, dim=-1), top_p, generator)


@torch.inference_mode()
def stream_tokens(model: ImageBindLLM, prompts: Sequence[Sequence[int]], visual: Tensor | None = None,
                  max_gen_len: int = 256, temperature: float = 0.1, top_p: float = 0.75, eos_id: int = 2,
                  generator: torch.Generator | None = None, use_cache: bool = True) -> Iterator[Tensor]:
    """Yield the new token of every row ``[B]`` at each step (rows past their EOS repeat ``eos_id``).

    ``prompts`` are token-id lists (BOS included); ``visual [B,1,D]`` is the bound visual token (or None
    for the plain decoder). ``use_cache=False`` recomputes the whole prefix each step (for tests/benches).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    llama = model.llama
    device = model.prefix_query.weight.device
    bsz = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    total_len = min(llama.cfg.max_seq_len, max_gen_len + int(lengths.max()))
    if int(lengths.max()) >= total_len:
        raise ValueError(f"prompt of {int(lengths.max())} tokens leaves no room under max_seq_len {llama.cfg.max_seq_len}")
    tokens = torch.full((bsz, total_len), eos_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long, device=device)
    dtype = llama.tok_embeddings.weight.dtype
    if device.type == "cpu":  # bit-identical, faster few-row products of the frozen bf16 weights
        enable_packed_linears(llama)
    # Frozen weights stored in bf16/fp16 beside fp32 trainables compute under autocast, as in training.
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16))
    with autocast:
        adapters = model.adapters(visual)
    caches = llama.new_cache(bsz, total_len, device, dtype) if use_cache else None
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    start, prev = int(lengths.min()), 0
    for cur in range(start, total_len):
        with autocast:
            if use_cache:
                logits = llama(tokens[:, prev:cur], adapters, start_pos=prev, caches=caches, last_only=True)
            else:
                logits = llama(tokens[:, :cur], adapters, last_only=True)
        new = next_token(logits[:, -1], temperature, top_p, generator)
        in_prompt = lengths > cur
        new = torch.where(in_prompt, tokens[:, cur], new)
        new = torch.where(done, torch.full_like(new, eos_id), new)
        tokens[:, cur] = new
        prev = cur
        generated_here = ~in_prompt & ~done
        done |= generated_here & (new == eos_id)
        done |= (cur + 1 - lengths) >= max_gen_len  # row reached its own generation budget
        yield torch.where(generated_here, new, torch.full_like(new, -1))
        if bool(done.all()):
            break


def generate_tokens(model: ImageBindLLM, prompts: Sequence[Sequence[int]], visual: Tensor | None = None,
                    max_gen_len: int = 256, temperature: float = 0.1, top_p: float = 0.75, eos_id: int = 2,
                    generator: torch.Generator | None = None, use_cache: bool = True,
                    on_token: Callable[[Tensor], None] | None = None) -> list[list[int]]:
    """Generate up to ``max_gen_len`` new ids per prompt; each row's list is cut before its first EOS."""
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for step in stream_tokens(model, prompts, visual, max_gen_len, temperature, top_p, eos_id, generator, use_cache):
        if on_token is not None:
            on_token(step)
        for row, tok in enumerate(step.tolist()):
            if tok < 0 or finished[row]:
                continue
            if tok == eos_id:
                finished[row] = True
            else:
                outputs[row].append(tok)
    return outputs


class IncrementalDecoder:
    """Turns a token stream into text deltas without splitting multi-byte characters."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        """Add one id; return the new text that is safe to print (may be empty)."""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._delta(text)

    def flush(self) -> str:
        """Whatever is left (including a trailing replacement character of a truly broken sequence)."""
        return self._delta(self.tokenizer.decode(self.ids)) if self.ids else ""

    def _delta(self, text: str) -> str:
        if text.startswith(self.emitted):
            new = text[len(self.emitted):]
        else:  # a tokenizer that re-normalises earlier text (rare): print only what extends the common prefix
            common = 0
            while common < min(len(text), len(self.emitted)) and text[common] == self.emitted[common]:
                common += 1
            new = text[common:] if common == len(self.emitted) else ""
            if common < len(self.emitted):
                return ""
        self.emitted = text
        return new


def stream_text(model: ImageBindLLM, tokenizer: Any, prompt: Sequence[int], visual: Tensor | None = None,
                max_gen_len: int = 256, temperature: float = 0.1, top_p: float = 0.75,
                generator: torch.Generator | None = None) -> Iterator[str]:
    """Yield the decoded text of one prompt's answer piece by piece as :func:`stream_tokens` produces it.

    ``prompt`` is one id list (BOS included), ``visual [1,1,D]`` its bound visual token (or None). Decoding
    is incremental over the whole answer so far; text that ends in an incomplete multi-byte character
    (U+FFFD) is held back until the next token completes it.
    """
    decoder = IncrementalDecoder(tokenizer)
    for step in stream_tokens(model, [list(prompt)], visual, max_gen_len, temperature, top_p, tokenizer.eos_id,
                              generator):
        tok = int(step[0])
        if tok < 0 or tok == tokenizer.eos_id:
            continue
        piece = decoder.push(tok)
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:
        yield rest
