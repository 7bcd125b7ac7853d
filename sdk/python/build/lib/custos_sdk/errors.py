from __future__ import annotations

"""The one error type of the SDK: a stable code and a sentence, as the node answers."""


class CustosError(Exception):
    """`code` is stable (the node's reason codes where the node refused); `message` is for people."""

    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
