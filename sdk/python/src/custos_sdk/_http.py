"""Small HTTP helpers on the standard library (no extra dependency)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from .errors import CustosError


class Answer:
    def __init__(self, status: int, headers, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            raise CustosError("bad_answer", f"HTTP {self.status} answer is not JSON: {self.body[:200]!r}") from None

    def error(self) -> CustosError:
        try:
            data = json.loads(self.body)
            return CustosError(data.get("error", "http_error"), data.get("message", ""), self.status)
        except (ValueError, AttributeError):
            return CustosError("http_error", f"HTTP {self.status}: {self.body[:200]!r}", self.status)


def request(method: str, url: str, body: bytes | None = None, token: str | None = None,
            content_type: str = "application/json", timeout: float = 10.0) -> Answer:
    """One request; an HTTP error status is an Answer, a transport failure an OSError."""
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = content_type
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return Answer(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, error.headers, error.read())
