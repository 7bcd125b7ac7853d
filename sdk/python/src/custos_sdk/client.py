"""Sends signed events to a node: batched, retried, never lost, never forked.

A batch is resent byte for byte until the node answers it: after a timeout the node may
already have stored it, and then answers `duplicate` for those events. With a file-backed
`Signer`, unanswered envelopes survive a restart of the agent and go first next time.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from ._http import request
from .errors import CustosError
from .signer import Signer

# Answers that mean "try the same bytes again later".
RETRYABLE = {408, 429, 500, 502, 503, 504}


@dataclass
class Result:
    """The node's answer for one envelope (docs/api.md, POST /v1/events)."""

    index: int
    status: str
    reason: str | None = None
    message: str | None = None
    log_index: int | None = None
    flags: list = field(default_factory=list)

    @property
    def stored(self) -> bool:
        return self.status in ("accepted", "duplicate")


class Client:
    """`Client(url, signer)`; `emit(kind, **fields)` then `flush()`, or use it as a
    context manager with `flush_interval` to flush in the background."""

    def __init__(self, url: str, signer: Signer | None = None, *, batch_size: int = 500,
                 timeout: float = 10.0, max_attempts: int = 8, backoff: float = 0.2,
                 flush_interval: float | None = None):
        if batch_size < 1 or batch_size > 10_000:
            raise CustosError("bad_batch_size", f"batch_size {batch_size} is not 1..10000 (the node's limit)")
        self.url = url.rstrip("/")
        self.signer = signer
        self.batch_size = batch_size
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.rejected: list[Result] = []
        self._flushing = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if flush_interval:
            self._thread = threading.Thread(target=self._run, args=(flush_interval,), daemon=True)
            self._thread.start()

    def emit(self, kind: str, **fields):
        """Signs one event (durably pending) and flushes when a batch is full."""
        if self.signer is None:
            raise CustosError("no_signer", "this client was made without a Signer")
        event = self.signer.sign(kind, **fields)
        if len(self.signer.pending()) >= self.batch_size:
            self.flush()
        return event

    def flush(self) -> list[Result]:
        """Sends everything pending; answers one Result per envelope sent."""
        if self.signer is None:
            return []
        results = []
        with self._flushing:
            while True:
                batch = self.signer.pending()[: self.batch_size]
                if not batch:
                    return results
                answered = self.send(batch)
                self.signer.answered(batch)
                results.extend(answered)

    def send(self, envelopes: list[str]) -> list[Result]:
        """Posts envelopes (JSON strings) as one NDJSON request, retrying what may be
        retried; raises CustosError when the node refuses the request itself."""
        body = "\n".join(envelopes).encode()
        attempt = 0
        while True:
            attempt += 1
            wait = self.backoff * 2 ** min(attempt - 1, 6) * (0.5 + random.random())
            try:
                answer = request("POST", f"{self.url}/v1/events", body, content_type="application/x-ndjson",
                                 timeout=self.timeout)
            except OSError as error:
                if attempt >= self.max_attempts:
                    raise CustosError("unreachable", f"{self.url} did not answer after {attempt} attempts: {error}") from None
                time.sleep(wait)
                continue
            if answer.status == 200:
                results = [self._result(item) for item in answer.json()]
                if len(results) != len(envelopes):
                    raise CustosError("bad_answer", f"{len(results)} results for {len(envelopes)} envelopes")
                self.rejected.extend(result for result in results if not result.stored)
                return results
            if answer.status in RETRYABLE and attempt < self.max_attempts:
                retry_after = answer.headers.get("Retry-After") if answer.headers else None
                if retry_after and retry_after.isdigit():
                    wait = max(wait, float(retry_after))
                time.sleep(wait)
                continue
            raise answer.error()

    @staticmethod
    def _result(item: dict) -> Result:
        return Result(
            index=item.get("index", 0),
            status=item.get("status", ""),
            reason=item.get("reason"),
            message=item.get("message"),
            log_index=item.get("log_index"),
            flags=item.get("flags") or [],
        )

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.flush()
            except CustosError:
                pass  # still pending; the next round tries again

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
