"""The batching scheduler: one worker thread owns the model and decodes queued requests together.

Requests that arrive together decode together. When the worker is free it takes the oldest waiting job
and every other waiting job that can share a kernel call with it (same sampling rule and both with or
both without media), up to ``max_batch``; a job that arrived less than ``batch_window_s`` ago is given
that long for company to arrive. The batch runs through ``InferenceModel.stream`` (the batched kernel:
per-row EOS, prompts of different lengths); each row stops on its own EOS, stop string, token budget or
cancellation, and the kernel call ends once every row has. Greedy rows batch with any greedy rows; sampled
rows batch only with rows of the same temperature and top-p, and a seeded sampled row runs alone (its
random stream must not depend on its neighbours). A request that arrives while a batch decodes waits for
that batch to end (the kernel cannot take new rows mid-flight), then leads or joins the next one.

The queue is bounded: :meth:`Scheduler.submit` raises a 429 :class:`APIError` when ``max_queue`` jobs
are waiting. Jobs talk to the HTTP side through an asyncio queue of events: ``("started",)`` once its
media is encoded, ``("delta", text)``, then ``("done", finish_reason, completion_tokens)`` or
``("error", APIError)``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

import torch

from ibllm.cli.common import RECOVERABLE, one_line
from ibllm.generation import IncrementalDecoder
from ibllm.server.messages import Prepared
from ibllm.server.schemas import APIError, ServerConfig

log = logging.getLogger(__name__)


class OutputText:
    """One answer's text as it grows: leading and trailing whitespace stripped, cut before the first stop
    string. :meth:`push` returns only text that can never be taken back (a tail that may start a stop
    string, or may be trailing whitespace, is held until the next piece decides)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.raw = ""
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add decoded text; return the new text that is safe to send."""
        self.raw += piece
        text = self.raw.lstrip()
        cut = min((i for s in self.stops if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut].rstrip()
            return self.flush()
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.text = text
        return self._send(len(text[: len(text) - hold].rstrip()))

    def flush(self) -> str:
        """The rest of the final (stripped) answer."""
        self.text = self.text.rstrip()
        return self._send(len(self.text))

    def _send(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out


class Job:
    """One request in the scheduler; created on the event loop that reads its events."""

    def __init__(self, prepared: Prepared, loop: asyncio.AbstractEventLoop) -> None:
        self.p = prepared
        self.loop = loop
        self.events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.reason = "cancelled"  # or "timed_out"
        self.arrived = time.monotonic()

    def key(self) -> tuple[Any, ...]:
        """Jobs with equal keys may share one kernel call."""
        media = bool(self.p.inputs)
        if self.p.temperature <= 0:
            return ("greedy", media)
        if self.p.seed is not None:
            return ("seeded", id(self))
        return ("sample", self.p.temperature, self.p.top_p, media)

    def emit(self, *event: Any) -> None:
        """Hand an event to the job's reader (thread-safe; dropped once the loop is closed)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop generating for this job (``cancelled``: the client left; ``timed_out``); harmless once it
        has finished."""
        if not self.cancelled.is_set():
            self.reason = reason
        self.cancelled.set()


class _Row:
    """Decoding state of one job inside a running batch."""

    def __init__(self, job: Job, tokenizer: Any) -> None:
        self.job = job
        self.decoder = IncrementalDecoder(tokenizer)
        self.out = OutputText(job.p.stops)
        self.tokens = 0
        self.finished = False
        self.outcome = ""  # done | cancelled | failed

    def push(self, token: int) -> None:
        self.tokens += 1
        delta = self.out.push(self.decoder.push(token))
        if delta:
            self.job.emit("delta", delta)
        if self.out.stopped:
            self.finish("stop")
        elif self.tokens >= self.job.p.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if not self.out.stopped:
            delta = self.out.push(self.decoder.flush()) + self.out.flush()
            if delta:
                self.job.emit("delta", delta)
        self.finished, self.outcome = True, "done"
        self.job.emit("done", reason, self.tokens)

    def fail(self, error: APIError) -> None:
        self.finished, self.outcome = True, "failed"
        self.job.emit("error", error)


class Scheduler:
    """Queue + worker thread over one ``InferenceModel`` (see the module docstring)."""

    def __init__(self, model: Any, config: ServerConfig) -> None:
        self.model = model
        self.config = config
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._running: list[_Row] = []
        self._thread = threading.Thread(target=self._work, name="ibllm-scheduler", daemon=True)
        self.stats = {"completed": 0, "cancelled": 0, "timed_out": 0, "failed": 0, "batches": 0,
                      "largest_batch": 0}

    # ---- the HTTP side ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the worker."""
        with self._cond:
            self._stopping = True
            for job in list(self._pending) + [r.job for r in self._running]:
                job.cancel()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue ``job``; a 429 when ``max_queue`` jobs are already waiting."""
        with self._cond:
            self._purge()
            if len(self._pending) >= self.config.max_queue:
                raise APIError(429, f"the server is busy: {len(self._pending)} requests are waiting (the queue "
                                    f"holds {self.config.max_queue}); retry later", code="queue_full",
                               kind="rate_limit_error")
            self._pending.append(job)
            self._cond.notify_all()

    def status(self) -> dict[str, int]:
        """Queue and worker counters for the health endpoint."""
        with self._cond:
            self._purge()
            return {"queued": len(self._pending),
                    "running": sum(not r.finished for r in self._running), **self.stats}

    # ---- the worker ------------------------------------------------------------------------------------
    def _purge(self) -> None:
        for job in [j for j in self._pending if j.cancelled.is_set()]:
            self._pending.remove(job)
            self.stats[job.reason] += 1

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                self._purge()
                if self._stopping:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                head = self._pending[0]
                same = [j for j in self._pending if j.key() == head.key()][: self.config.max_batch]
                wait = head.arrived + self.config.batch_window_s - time.monotonic()
                if wait > 0 and len(same) < self.config.max_batch:
                    self._cond.wait(wait)
                    continue
                for job in same:
                    self._pending.remove(job)
                return same

    def _work(self) -> None:
        while (jobs := self._next_batch()) is not None:
            try:
                self._run_batch(jobs)
            except Exception as e:  # noqa: BLE001 - a failed batch must not stop the server
                log.exception("batch of %d failed", len(jobs))
                for row in self._running:
                    if not row.finished:
                        row.fail(APIError(500, f"generation failed: {one_line(e)}"))
            finally:
                with self._cond:
                    for row in self._running:
                        self.stats["completed" if row.outcome == "done" else row.outcome or row.job.reason] += 1
                    self._running = []

    def _encode(self, jobs: list[Job]) -> tuple[list[_Row], torch.Tensor | None]:
        rows, visuals = [], []
        for job in jobs:
            try:
                visual = self.model.visual(job.p.inputs, job.p.cache) if job.p.inputs else None
            except RECOVERABLE as e:
                job.emit("error", APIError(400, f"cannot encode the inputs: {one_line(e)}", code="invalid_media"))
                self.stats["failed"] += 1
                continue
            rows.append(_Row(job, self.model.tokenizer))
            visuals.append(visual)
        if not rows or visuals[0] is None:
            return rows, None
        return rows, torch.cat(visuals)

    def _run_batch(self, jobs: list[Job]) -> None:
        rows, visual = self._encode(jobs)
        if not rows:
            return
        with self._cond:
            self._running = rows
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        for row in rows:
            row.job.emit("started")
        p = rows[0].job.p
        eos = self.model.tokenizer.eos_id
        budget = max(r.job.p.max_tokens for r in rows)
        stream = self.model.stream([r.job.p.ids for r in rows], visual, max_gen_len=budget, temperature=p.temperature,
                                   top_p=p.top_p, seed=p.seed)
        try:
            for step in stream:
                for row, tok in zip(rows, step.tolist()):
                    if row.finished:
                        continue
                    if row.job.cancelled.is_set():
                        row.finished, row.outcome = True, row.job.reason
                    elif tok == eos:
                        row.finish("stop")
                    elif tok >= 0:
                        row.push(tok)
                if all(r.finished for r in rows) or self._stopping:
                    break
        finally:
            stream.close()
        for row in rows:
            if row.finished:
                continue
            if self._stopping:
                row.fail(APIError(503, "the server is shutting down", code="shutting_down"))
            else:  # the kernel reached the context end
                row.finish("length")
