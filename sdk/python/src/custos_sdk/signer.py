"""The agent's side of the hash chain: `seq` and `prev`, kept durably.

With files (``Signer.open(key_file, realm)``), the state lives beside the key exactly as
`custos emit` keeps it, so both can share one key:

- ``<key>.chain.json``: ``{"next_seq": N, "prev": "<blake3 hex>" | null}``;
- ``<key>.pending.ndjson``: every signed envelope not yet answered by the node.

An envelope is in the pending file (fsynced) before the chain state moves past it, and
at open the state is taken past the last pending envelope too. So a crash at any point
never signs one `seq` twice with different bytes (a fork the node refuses as
`chain_fork`); the pending envelope is sent again, byte for byte, and answered
`duplicate` if the node already had it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
import threading
from dataclasses import dataclass

import blake3

from . import payload as _payload
from .dsse import EVENT_PAYLOAD_TYPE, sign_envelope
from .errors import CustosError
from .key import AgentKey


@dataclass(frozen=True)
class SignedEvent:
    seq: int
    payload: bytes
    envelope: str


def _write_atomic(path: str, data: bytes) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _envelope_payload(line: str) -> bytes:
    try:
        return base64.b64decode(json.loads(line)["payload"])
    except (ValueError, KeyError, TypeError):
        raise CustosError("bad_pending", f"a pending line is not a Custos envelope: {line[:80]}") from None


class Signer:
    """Signs payloads as `key`, filling in `agent`, `seq`, `prev`, `realm` and `ts`."""

    def __init__(
        self,
        key: AgentKey,
        realm: str,
        chain_path: str | None = None,
        pending_path: str | None = None,
        next_seq: int = 0,
        prev: str | None = None,
    ):
        self.key = key
        self.realm = realm
        self.chain_path = chain_path
        self.pending_path = pending_path
        self.next_seq = next_seq
        self.prev = prev
        self._lock = threading.Lock()
        self._pending: list[str] = []
        if chain_path and os.path.exists(chain_path):
            with open(chain_path, encoding="utf-8") as file:
                try:
                    state = json.load(file)
                    self.next_seq, self.prev = int(state["next_seq"]), state["prev"]
                except (ValueError, KeyError, TypeError):
                    raise CustosError("bad_chain_state", f"`{chain_path}` is not chain state") from None
        if pending_path and os.path.exists(pending_path):
            with open(pending_path, encoding="utf-8") as file:
                self._pending = [line for line in file.read().split("\n") if line.strip()]
            if self._pending:
                last = _envelope_payload(self._pending[-1])
                seq = json.loads(last).get("seq", -1)
                if seq + 1 > self.next_seq:
                    # Signed and kept, but the chain state was not saved after it.
                    self.next_seq, self.prev = seq + 1, blake3.blake3(last).hexdigest()
                    self._save_chain()

    @classmethod
    def open(cls, key_file: str, realm: str) -> "Signer":
        """The key in `key_file`, with its chain state and pending envelopes beside it."""
        return cls(AgentKey.load(key_file), realm, f"{key_file}.chain.json", f"{key_file}.pending.ndjson")

    def _save_chain(self) -> None:
        if self.chain_path:
            state = json.dumps({"next_seq": self.next_seq, "prev": self.prev}, separators=(",", ":"))
            _write_atomic(self.chain_path, state.encode())

    def _save_pending(self) -> None:
        if self.pending_path:
            _write_atomic(self.pending_path, "\n".join(self._pending).encode())

    def sign(self, kind: str, *, ts: _dt.datetime | str | None = None, **fields) -> SignedEvent:
        """Signs one event (keyword arguments are the payload's optional members)."""
        return self.sign_many([dict(fields, kind=kind, ts=ts)])[0]

    def sign_many(self, events: list[dict]) -> list[SignedEvent]:
        """Signs several events in order, with one fsync for them all."""
        with self._lock:
            signed = []
            seq, prev = self.next_seq, self.prev
            for fields in events:
                fields = dict(fields)
                if "agent" in fields or "seq" in fields or "prev" in fields:
                    raise CustosError("bad_payload", "agent, seq and prev are the signer's to fill in")
                fields.setdefault("realm", self.realm)
                if fields.get("ts") is None:
                    fields["ts"] = _dt.datetime.now(_dt.timezone.utc)
                fields.update(agent=self.key.did, seq=seq, prev=prev)
                body = _payload.encode(fields)
                signed.append(SignedEvent(seq, body, sign_envelope(self.key, EVENT_PAYLOAD_TYPE, body)))
                seq, prev = seq + 1, blake3.blake3(body).hexdigest()
            self._pending.extend(event.envelope for event in signed)
            self._save_pending()
            self.next_seq, self.prev = seq, prev
            self._save_chain()
            return signed

    def pending(self) -> list[str]:
        """Signed envelopes the node has not answered yet, oldest first."""
        with self._lock:
            return list(self._pending)

    def answered(self, envelopes: list[str]) -> None:
        """Drops envelopes the node answered (accepted, duplicate or rejected)."""
        done = set(envelopes)
        with self._lock:
            self._pending = [line for line in self._pending if line not in done]
            self._save_pending()
