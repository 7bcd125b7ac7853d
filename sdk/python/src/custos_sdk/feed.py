"""Enforcement at the agent platform: who is revoked, which memory is quarantined.

`EnforcementFeed` holds the node's signed revocation list (`GET /v1/control/revocations`,
a DSSE envelope the node key signs) and follows `GET /v1/control/stream` on a thread.
A stream event that makes things stricter (a revocation, a quarantine) is applied at
once; every event also makes the feed fetch the signed list again, and only a list whose
signature verifies can lift anything (a reinstatement, a restored memory). A list older
than one already held (a smaller `log_size`) is refused, so a replayed list cannot
un-revoke an agent.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

from ._http import request
from .dsse import REVOCATIONS_PAYLOAD_TYPE, open_envelope
from .errors import CustosError

_STRICTER = {"agent_revoked": "revoked", "agent_quarantined": "quarantined"}


class EnforcementFeed:
    """`EnforcementFeed(url, token, node_did)`; `start()`; then ask `is_revoked(did)` and
    `is_quarantined(memory_id)` locally. Pass `node_did` (printed by `custos serve`,
    and in `GET /v1/checkpoints/latest`) so a substituted list is refused; without it the
    feed trusts the node_did the node reports on first use."""

    def __init__(self, url: str, token: str, node_did: str | None = None, *, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.token = token
        self.node_did = node_did
        self.timeout = timeout
        self.log_size = -1
        self._agents: dict[str, str] = {}
        self._memories: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._connected = threading.Event()
        self.errors: list[CustosError] = []

    # What the platform asks.
    def is_revoked(self, did: str) -> bool:
        with self._lock:
            return self._agents.get(did) == "revoked"

    def agent_status(self, did: str) -> str:
        """`revoked`, `quarantined`, or `active` (not listed)."""
        with self._lock:
            return self._agents.get(did, "active")

    def is_quarantined(self, memory_id: str) -> bool:
        with self._lock:
            return memory_id in self._memories

    # Keeping up.
    def refresh(self) -> dict:
        """Fetches and verifies the signed list, and holds it; answers its payload."""
        if self.node_did is None:
            answer = request("GET", f"{self.url}/v1/checkpoints/latest", token=self.token, timeout=self.timeout)
            if answer.status != 200:
                raise answer.error()
            self.node_did = answer.json()["node_did"]
        answer = request("GET", f"{self.url}/v1/control/revocations", token=self.token, timeout=self.timeout)
        if answer.status != 200:
            raise answer.error()
        body = open_envelope(answer.body.decode(), REVOCATIONS_PAYLOAD_TYPE, self.node_did)
        listing = json.loads(body)
        if listing.get("issuer") != self.node_did:
            raise CustosError("wrong_issuer", f"the list names issuer `{listing.get('issuer')}`, not `{self.node_did}`")
        with self._lock:
            if listing["log_size"] < self.log_size:
                raise CustosError(
                    "stale_list",
                    f"the list reflects log size {listing['log_size']}, older than the {self.log_size} already held",
                )
            agents = {entry["did"]: "quarantined" for entry in listing.get("quarantined_agents", [])}
            agents.update({entry["did"]: "revoked" for entry in listing.get("revoked_agents", [])})
            self._agents = agents
            self._memories = {
                entry["id"] for entry in listing.get("quarantined_memories", []) if entry.get("status") == "quarantined"
            }
            self.log_size = listing["log_size"]
        return listing

    def start(self) -> "EnforcementFeed":
        """Fetches the list, then follows the stream on a thread (reconnecting)."""
        self.refresh()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()
        self._connected.wait(self.timeout)
        return self

    def stop(self) -> None:
        self._stop.set()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _apply(self, name: str, data: dict) -> None:
        with self._lock:
            if name in _STRICTER and data.get("agent"):
                if self._agents.get(data["agent"]) != "revoked":
                    self._agents[data["agent"]] = _STRICTER[name]
            if name == "memory_quarantined" and data.get("subject"):
                self._memories.add(data["subject"])

    def _follow(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                self._read_stream()
                delay = 0.1
            except (OSError, CustosError, ValueError) as error:
                self.errors.append(error if isinstance(error, CustosError) else CustosError("stream", str(error)))
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, 5.0)
            try:
                self.refresh()  # whatever changed while away
            except (OSError, CustosError, ValueError) as error:
                self.errors.append(error if isinstance(error, CustosError) else CustosError("refresh", str(error)))

    def _read_stream(self) -> None:
        req = urllib.request.Request(
            f"{self.url}/v1/control/stream",
            headers={"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"},
        )
        # The node sends a keep-alive comment every 15 s.
        with urllib.request.urlopen(req, timeout=45) as response:
            self._connected.set()
            name, data = None, []
            while not self._stop.is_set():
                line = response.readline()
                if not line:
                    return
                line = line.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
                elif line == "" and name:
                    self._event(name, "\n".join(data))
                    name, data = None, []

    def _event(self, name: str, data: str) -> None:
        if name == "token_invalid":
            raise CustosError("token_invalid", "the node ended the stream: the token is no longer valid")
        if name != "lagged":
            try:
                self._apply(name, json.loads(data))
            except ValueError:
                pass
        # Only the signed list is authoritative; fetch it after every change.
        for attempt in range(3):
            try:
                self.refresh()
                return
            except CustosError as error:
                if error.code == "stale_list":
                    return
                time.sleep(0.05 * (attempt + 1))
