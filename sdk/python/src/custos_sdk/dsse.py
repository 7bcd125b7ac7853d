"""DSSE envelopes as Custos writes them: one signature, compact JSON, fixed member order."""

from __future__ import annotations

import base64
import binascii
import json

from .errors import CustosError
from .key import AgentKey, verify

EVENT_PAYLOAD_TYPE = "application/vnd.custos.event+json"
REVOCATIONS_PAYLOAD_TYPE = "application/vnd.custos.revocations+json"


def pae(payload_type: str, body: bytes) -> bytes:
    """The DSSE pre-authentication encoding the signature covers."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)


def envelope_json(payload_type: str, payload: bytes, keyid: str, sig: bytes) -> str:
    """The envelope exactly as the node and the test vectors spell it."""
    return json.dumps(
        {
            "payloadType": payload_type,
            "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": keyid, "sig": base64.b64encode(sig).decode()}],
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )


def sign_envelope(key: AgentKey, payload_type: str, payload: bytes) -> str:
    return envelope_json(payload_type, payload, key.did, key.sign(pae(payload_type, payload)))


def _b64(text: str) -> bytes:
    # DSSE allows standard or URL-safe base64, padded or not.
    text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    return base64.b64decode(text, validate=True)


def open_envelope(envelope: str | dict, payload_type: str, signer_did: str) -> bytes:
    """The payload of `envelope` once its one signature verifies as `signer_did`'s over
    `payload_type`; a `CustosError` naming what is wrong otherwise."""
    if isinstance(envelope, str):
        try:
            envelope = json.loads(envelope)
        except json.JSONDecodeError as error:
            raise CustosError("bad_envelope", f"the envelope is not JSON: {error}") from None
    if not isinstance(envelope, dict) or set(envelope) != {"payloadType", "payload", "signatures"}:
        raise CustosError("bad_envelope", "a DSSE envelope has exactly payloadType, payload and signatures")
    if envelope["payloadType"] != payload_type:
        raise CustosError("bad_payload_type", f"payloadType `{envelope['payloadType']}`, expected `{payload_type}`")
    signatures = envelope["signatures"]
    if not isinstance(signatures, list) or len(signatures) != 1:
        raise CustosError("bad_envelope", "exactly one signature is expected")
    signature = signatures[0]
    if signature.get("keyid") != signer_did:
        raise CustosError("wrong_signer", f"signed by `{signature.get('keyid')}`, expected `{signer_did}`")
    try:
        payload = _b64(envelope["payload"])
        sig = _b64(signature["sig"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise CustosError("bad_envelope", "payload or sig is not base64") from None
    if len(sig) != 64 or not verify(signer_did, pae(payload_type, payload), sig):
        raise CustosError("bad_signature", f"the signature does not verify as `{signer_did}`'s")
    return payload
