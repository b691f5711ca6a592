"""The batching engine: one worker thread runs the model for every request.

HTTP handlers run on the asyncio event loop and must never block on the model, so generation lives on a
dedicated thread that owns the backend. Handlers :meth:`Engine.submit` sequences and receive
:class:`Event` objects through a callback (which hops back onto the event loop).

Batching is continuous (``reformer_dist.decoding.ContinuousBatcher``, the decoding runtime that
``reformer-dist generate`` runs too): the worker keeps a batch of up to ``max_batch_size`` active
sequences and runs one cached decode step for all of them at a time. Between steps, finished, timed-out
and cancelled sequences leave (their rows are dropped, the others untouched) and queued ones join (their
prompts are prefilled and merged into the batch cache), so a short request never waits for a long one to
end. Tokens are chosen by each sequence's ``Sampler``. When the engine is idle, the first arrival waits
``batch_window_ms`` for company before the first step (dynamic batching). Admission is bounded: more than
``max_concurrency`` sequences queued + running is refused (HTTP 429 upstream).

Scoring requests (``/v1/score``, echoed prompts' log-probabilities) are full-sequence forwards; they run
on the same thread, between decode steps, so the model is never driven from two threads at once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from reformer_dist.decoding.backend import DecodingBackend, TokenScores
from reformer_dist.decoding.batcher import ContinuousBatcher
from reformer_dist.decoding.sampler import Sampler, SamplingParams, log_softmax, top_logprobs
from reformer_dist.serve.config import ServeConfig
from reformer_dist.serve.metrics import ServerMetrics
from reformer_dist.serve.protocol import ApiError
from reformer_dist.serve.textstream import Detokenizer, TextStream

log = logging.getLogger("reformer_dist.serve")

THROUGHPUT_WINDOW_S = 10.0  # the tokens/s gauge averages over this many recent seconds


@dataclass
class TokenInfo:
    """One token, as reported with ``logprobs`` (an echoed prompt's first token has no log p: None)."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class Event:
    """Something that happened to one sequence: new text, and/or its end, or an error."""

    index: int
    """Which choice of the request (prompt i, sample j → i*n + j)."""
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    """'stop' (stop string), 'length' (max_tokens or max_seq_len); None while running."""
    error: ApiError | None = None
    """Set (and final) when the sequence failed: timeout, backend failure, shutdown."""


Deliver = Callable[[Event], None]


class Sequence:
    """One prompt being completed: its tokens so far (prompt first) and its sampler."""

    def __init__(self, index: int, prompt_ids: list[int], params: SamplingParams, tokenizer: Detokenizer,
                 deliver: Deliver, vocab_size: int):
        self.index = index
        self.tokens = list(prompt_ids)
        self.n_prompt = len(prompt_ids)
        self.params = params
        self.deliver = deliver
        self.text = TextStream(tokenizer, params.stop)
        self.sampler = Sampler(params, vocab_size)
        self.joined = False  # in the batcher (prefilled)
        self.cancelled = False  # set from the event loop when the client went away
        self.finished = False  # left the engine (guards the admission count against double release)
        self.admitted_at = 0.0
        self.deadline = 0.0
        self.first_token_at: float | None = None

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.n_prompt


@dataclass
class ScoreJob:
    """Full-sequence log-likelihood of some token sequences; ``done`` receives, per sequence, the log p of
    each token given the previous ones (len-1 values) and the ``top`` likeliest alternatives at each, or
    an ApiError."""

    sequences: list[list[int]]
    done: Callable[[list[TokenScores] | ApiError], None]
    top: int = 0


class Overloaded(Exception):
    """Admission refused: the queue is full (HTTP 429)."""


class Draining(Exception):
    """Admission refused: the server is shutting down (HTTP 503)."""


class Engine:
    def __init__(self, backend: DecodingBackend, tokenizer: Detokenizer, cfg: ServeConfig, metrics: ServerMetrics,
                 eos_token_id: int | None = None):
        self.backend = backend
        self.batcher = ContinuousBatcher(backend)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.metrics = metrics
        self.eos_token_id = eos_token_id
        self.max_batch_size = min(cfg.max_batch_size, backend.max_batch_size or cfg.max_batch_size)
        self._cv = threading.Condition()
        self._pending: collections.deque[Sequence] = collections.deque()
        self._scores: collections.deque[ScoreJob] = collections.deque()
        self._load = 0  # sequences admitted and not finished (queued + active), guarded by _cv
        self._draining = False
        self._stopping = False
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self._thread = threading.Thread(target=self._run, name="reformer-serve-engine", daemon=True)

    # ------------------------------------------------------------------ called from the event loop
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """Refuse new work from now on; what is admitted still completes."""
        with self._cv:
            self._draining = True

    def stop(self, timeout: float | None = None) -> None:
        """Finish the admitted work (up to ``timeout`` seconds), then end the worker thread."""
        with self._cv:
            self._draining = True
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue the sequences of one request (all or none). Raises Overloaded or Draining."""
        with self._cv:
            self._admit(len(seqs))
            now = time.monotonic()
            for s in seqs:
                s.admitted_at = now
                s.deadline = now + self.cfg.request_timeout_s
                self.metrics.prompt_tokens.inc(s.n_prompt)
            self._pending.extend(seqs)
            self.metrics.queue_depth.set(len(self._pending))
            self._cv.notify_all()

    def submit_score(self, job: ScoreJob) -> None:
        """Queue a scoring job (it counts one slot per text). Raises Overloaded or Draining."""
        with self._cv:
            self._admit(len(job.sequences))
            self._scores.append(job)
            self._cv.notify_all()

    def _admit(self, n: int) -> None:
        """Reserve n slots of max_concurrency (caller holds _cv)."""
        if self._draining:
            self.metrics.rejected.labels("draining").inc()
            raise Draining()
        if self._load + n > self.cfg.max_concurrency:
            self.metrics.rejected.labels("queue_full").inc()
            raise Overloaded()
        self._load += n

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last THROUGHPUT_WINDOW_S seconds."""
        now = time.monotonic()
        with self._cv:
            return sum(n for t, n in self._recent if now - t <= THROUGHPUT_WINDOW_S) / THROUGHPUT_WINDOW_S

    # ------------------------------------------------------------------ the worker thread
    def _run(self) -> None:
        active: list[Sequence] = []
        while True:
            joining, scores = self._wait_for_work(active)
            if joining is None:
                break
            for job in scores:
                self._score(job)
            active.extend(joining)
            try:
                active = self._drop_finished_early(active)
                if active:
                    active = self._step(active)
            except Exception:  # a bug must cost this batch, not the server: the worker keeps running
                log.exception("engine step failed; failing the %d sequences of the batch", len(active))
                for s in active:
                    self._finish(s, error=ApiError(500, "internal error while generating", "server_error"))
                active = []
                self.batcher.clear()
            self.metrics.active_sequences.set(len(active))

    def _wait_for_work(self, active: list[Sequence]) -> tuple[list[Sequence] | None, list[ScoreJob]]:
        """Block until there is something to do; return the sequences joining the batch and score jobs.
        Returns (None, []) when the engine should exit."""
        with self._cv:
            if not active:
                while not self._pending and not self._scores:
                    if self._stopping:
                        return None, []
                    self._cv.wait()
                # Idle → busy: hold the first arrival a moment so concurrent requests share the first step.
                window_end = time.monotonic() + self.cfg.batch_window_ms / 1000.0
                while self._pending and len(self._pending) < self.max_batch_size and not self._stopping:
                    left = window_end - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            free = self.max_batch_size - len(active)
            joining = [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
            scores = list(self._scores)
            self._scores.clear()
            self.metrics.queue_depth.set(len(self._pending))
            # Queued sequences can time out before they ever get a slot.
            now = time.monotonic()
            expired = [s for s in self._pending if s.deadline < now or s.cancelled]
            for s in expired:
                self._pending.remove(s)
        for s in expired:
            self._finish(s, error=None if s.cancelled else self.timeout_error())
        return joining, scores

    def _drop_finished_early(self, active: list[Sequence]) -> list[Sequence]:
        now = time.monotonic()
        keep, gone = [], []
        for s in active:
            if s.cancelled:
                self._finish(s)
            elif s.deadline < now:
                self._finish(s, error=self.timeout_error())
            else:
                keep.append(s)
                continue
            gone.append(s)
        self.batcher.leave(gone)
        return keep

    def _logits(self, active: list[Sequence]) -> list[np.ndarray]:
        """Next-token logits (V,) of every active sequence: one decode step for the members of the batch
        (fed their last token), a prefill for the newcomers, who then join it."""
        rows: dict[int, np.ndarray] = {}
        if self.batcher.members:
            step = self.batcher.decode({s: s.tokens[-1] for s in self.batcher.members})
            rows.update((id(s), row) for s, row in zip(self.batcher.members, step))
        joining = [s for s in active if not s.joined]
        if joining:
            prefilled = self.batcher.join(joining, [s.tokens for s in joining])
            rows.update((id(s), row) for s, row in zip(joining, prefilled))
            for s in joining:
                s.joined = True
        return [rows[id(s)] for s in active]

    def _step(self, active: list[Sequence]) -> list[Sequence]:
        """One decode step for the whole batch; returns the sequences still running."""
        t0 = time.monotonic()
        try:
            logits = self._logits(active)
        except Exception:
            log.exception("model step failed for a batch of %d", len(active))
            for s in active:
                self._finish(s, error=ApiError(500, "the model failed on this batch", "server_error"))
            self.batcher.clear()
            return []
        now = time.monotonic()
        self.metrics.step_seconds.observe(now - t0)
        self.metrics.batch_size.observe(len(active))
        self.metrics.generated_tokens.inc(len(active))
        with self._cv:
            self._recent.append((now, len(active)))
            while self._recent and now - self._recent[0][0] > THROUGHPUT_WINDOW_S:
                self._recent.popleft()

        running, finished = [], []
        for s, row in zip(active, logits):
            token = s.sampler.choose(row)
            s.tokens.append(token)
            if s.first_token_at is None:
                s.first_token_at = now
                self.metrics.time_to_first_token.observe(now - s.admitted_at)
            infos = []
            if s.params.logprobs is not None:
                logp = log_softmax(row)
                infos = [TokenInfo(token, float(logp[token]), top_logprobs(logp, s.params.logprobs))]
            finish = None
            if token == self.eos_token_id:
                text, finish = "", "stop"
            else:
                text = s.text.push(token)
                if s.text.stopped:
                    finish = "stop"
            if finish is None and (s.n_generated >= s.params.max_tokens
                                   or len(s.tokens) >= self.backend.max_seq_len):
                finish = "length"
            if finish is not None:
                text += s.text.finish()
            self._send(s, Event(s.index, text, infos, finish))
            if finish is None:
                running.append(s)
            else:
                self._finish(s)
                finished.append(s)
        self.batcher.leave(finished)
        return running

    def _score(self, job: ScoreJob) -> None:
        try:
            result: list[TokenScores] | ApiError = self.backend.score(job.sequences, job.top)
        except Exception:
            log.exception("scoring failed")
            result = ApiError(500, "the model failed to score this text", "server_error")
        with self._cv:
            self._load -= len(job.sequences)
        try:
            job.done(result)
        except Exception:  # the caller's loop may be gone; the worker must survive that
            log.exception("could not deliver a score result")

    # ------------------------------------------------------------------ bookkeeping
    def timeout_error(self) -> ApiError:
        return ApiError(504, f"the request did not finish within {self.cfg.request_timeout_s:g} s "
                             f"(serve.request_timeout_s)", "timeout_error")

    def _send(self, s: Sequence, event: Event) -> None:
        try:
            s.deliver(event)
        except Exception:  # the request's event loop is gone: nobody listens any more
            s.cancelled = True

    def _fail(self, s: Sequence, error: ApiError) -> None:
        self._send(s, Event(s.index, error=error))

    def _finish(self, s: Sequence, error: ApiError | None = None) -> None:
        """The sequence leaves the engine (its final event, if any, was sent or is ``error``); the caller
        drops it from the batcher."""
        if s.finished:
            return
        s.finished = True
        if error is not None:
            self._fail(s, error)
        with self._cv:
            self._load -= 1
