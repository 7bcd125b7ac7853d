"""Event payloads, serialised as the Rust `custos-event` crate serialises them.

Members in the order of docs/event-format.md's table, absent optional members left out,
`attrs` in the caller's order, compact JSON, UTF-8 without escaping non-ASCII.
The node signs nothing of this; the agent's signature covers these bytes as they are.
"""

from __future__ import annotations

import datetime as _dt
import json
import re

from .errors import CustosError

KINDS = (
    "tool_call", "tool_result", "llm_call", "memory_read", "memory_write", "memory_delete",
    "credential_use", "delegation", "message_sent", "message_received", "file_read",
    "file_write", "policy_change", "auth",
)
OUTCOMES = ("ok", "denied", "error")
# The order the node's own encoder writes them in.
FIELDS = (
    "agent", "seq", "prev", "ts", "realm", "kind", "action", "target", "outcome",
    "bytes_in", "bytes_out", "tokens_in", "tokens_out", "session", "trace_id", "span_id",
    "parent", "memory_id", "attrs",
)
OPTIONAL = FIELDS[6:]
_INTEGERS = ("bytes_in", "bytes_out", "tokens_in", "tokens_out")
_SHORT = ("action", "session", "parent", "memory_id")
_REALM = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_TRACE = re.compile(r"^[0-9a-f]{32}$")
_SPAN = re.compile(r"^[0-9a-f]{16}$")


def format_ts(ts: _dt.datetime | str) -> str:
    """RFC 3339 in UTC with `Z`: whole seconds bare, else milli- or microseconds."""
    if isinstance(ts, str):
        return ts
    if ts.tzinfo is None:
        raise CustosError("bad_payload", "ts must be timezone-aware (UTC)")
    ts = ts.astimezone(_dt.timezone.utc)
    text = ts.strftime("%Y-%m-%dT%H:%M:%S")
    if ts.microsecond:
        text += f".{ts.microsecond // 1000:03d}" if ts.microsecond % 1000 == 0 else f".{ts.microsecond:06d}"
    return text + "Z"


def _bad(message: str) -> CustosError:
    return CustosError("bad_payload", message)


def check(fields: dict) -> None:
    """Refuses, before signing, what the node would refuse as `bad_payload`."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise _bad(f"unknown field(s) {sorted(unknown)}; put extra data in attrs")
    if fields.get("kind") not in KINDS:
        raise _bad(f"kind `{fields.get('kind')}` is not one of {', '.join(KINDS)}")
    realm = fields.get("realm")
    if not isinstance(realm, str) or not _REALM.match(realm):
        raise _bad(f"realm `{realm}` is not 1-64 characters of [A-Za-z0-9._-]")
    if "outcome" in fields and fields["outcome"] not in OUTCOMES:
        raise _bad(f"outcome `{fields['outcome']}` is not ok, denied or error")
    for name in _INTEGERS:
        value = fields.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64):
            raise _bad(f"{name} `{value}` is not an unsigned 64-bit integer")
    for name in _SHORT:
        value = fields.get(name)
        if value is not None and (not isinstance(value, str) or len(value.encode()) > 256):
            raise _bad(f"{name} must be a string of at most 256 bytes")
    if fields.get("target") is not None and (
        not isinstance(fields["target"], str) or len(fields["target"].encode()) > 4096
    ):
        raise _bad("target must be a string of at most 4096 bytes")
    if fields.get("trace_id") is not None and not _TRACE.match(str(fields["trace_id"])):
        raise _bad(f"trace_id `{fields['trace_id']}` is not 32 lowercase hex digits")
    if fields.get("span_id") is not None and not _SPAN.match(str(fields["span_id"])):
        raise _bad(f"span_id `{fields['span_id']}` is not 16 lowercase hex digits")
    if fields.get("attrs") is not None and not isinstance(fields["attrs"], dict):
        raise _bad("attrs must be an object")


def encode(fields: dict) -> bytes:
    """The payload bytes: members in FIELDS order, `None` optional members left out."""
    check(fields)
    ordered = {}
    for name in FIELDS:
        if name in fields and (name not in OPTIONAL or fields[name] is not None):
            ordered[name] = fields[name]
    ordered["ts"] = format_ts(ordered["ts"])
    try:
        return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise _bad(f"the payload cannot be JSON: {error}") from None
