"""Agent keys: ed25519, named by did:key, stored in Custos key files.

A key file is the same JSON `custos agent keygen` writes, owner-only (mode 0600)::

    {"type":"custos-ed25519-key","did":"did:key:z6Mk…","seed":"<base64 of 32 bytes>"}
"""

from __future__ import annotations

import base64
import json
import os
import stat

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from . import _base58
from .errors import CustosError

KEY_TYPE = "custos-ed25519-key"
_ED25519_PUB = b"\xed\x01"


def did_from_public_key(public_key: bytes) -> str:
    """`did:key:z…` of a 32-byte ed25519 public key."""
    if len(public_key) != 32:
        raise CustosError("bad_keyid", f"an ed25519 public key has 32 bytes, not {len(public_key)}")
    return "did:key:z" + _base58.encode(_ED25519_PUB + public_key)


def public_key_from_did(did: str) -> bytes:
    """The 32-byte ed25519 public key a `did:key` names."""
    if not did.startswith("did:key:z"):
        raise CustosError("bad_keyid", f"`{did}` is not a base58btc did:key (did:key:z…)")
    try:
        raw = _base58.decode(did[len("did:key:z"):])
    except ValueError as error:
        raise CustosError("bad_keyid", f"`{did}`: {error}") from None
    if raw[:2] != _ED25519_PUB or len(raw) != 34:
        raise CustosError("bad_keyid", f"`{did}` does not name an ed25519 key (multicodec 0xed01, 32 bytes)")
    return raw[2:]


def verify(did: str, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is `did`'s ed25519 signature over `message`."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key_from_did(did)).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


class AgentKey:
    """An agent's ed25519 key. Its identity is `did`."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.did = did_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> "AgentKey":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "AgentKey":
        if len(seed) != 32:
            raise CustosError("bad_key", f"an ed25519 seed has 32 bytes, not {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def seed(self) -> bytes:
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AgentKey":
        """Reads a key file, refusing one that group or others can read."""
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if os.name == "posix" and mode & 0o077:
            raise CustosError(
                "key_permissions",
                f"key file `{path}` is readable by others (mode {mode:o}); run `chmod 600 {path}`",
            )
        with open(path, "r", encoding="utf-8") as file:
            try:
                data = json.load(file)
            except json.JSONDecodeError as error:
                raise CustosError("bad_key", f"key file `{path}` is not JSON: {error}") from None
        if not isinstance(data, dict) or data.get("type") != KEY_TYPE or set(data) != {"type", "did", "seed"}:
            raise CustosError("bad_key", f"key file `{path}` is not a Custos key ({KEY_TYPE})")
        try:
            seed = base64.b64decode(data["seed"], validate=True)
        except ValueError:
            raise CustosError("bad_key", f"key file `{path}`: seed is not base64") from None
        key = cls.from_seed(seed)
        if key.did != data["did"]:
            raise CustosError("bad_key", f"key file `{path}`: its seed is {key.did}, not {data['did']}")
        return key

    def save(self, path: str | os.PathLike) -> None:
        """Writes a new owner-only key file; never overwrites one."""
        text = json.dumps(
            {"type": KEY_TYPE, "did": self.did, "seed": base64.b64encode(self.seed).decode()},
            indent=2,
        ) + "\n"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise CustosError("key_exists", f"key file `{path}` already exists; refusing to overwrite a key") from None
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())

    def __repr__(self) -> str:
        return f"AgentKey({self.did})"
