"""The SDK against the published formats: docs/test-vectors.json, byte for byte."""

import base64
import json
import os

import blake3
import pytest

from custos_sdk import AgentKey, CustosError, Signer, open_envelope, pae, public_key_from_did
from custos_sdk.otel import map_span
from custos_sdk.payload import encode


def test_the_key_and_did_match_the_vectors(vectors):
    key = AgentKey.from_seed(bytes.fromhex(vectors["agent"]["seed_hex"]))
    assert key.public_key.hex() == vectors["agent"]["public_key_hex"]
    assert key.did == vectors["agent"]["did"]
    assert public_key_from_did(key.did).hex() == vectors["agent"]["public_key_hex"]


def test_a_signer_reproduces_every_vector_envelope(vectors):
    key = AgentKey.from_seed(bytes.fromhex(vectors["agent"]["seed_hex"]))
    signer = Signer(key, "eng")
    for vector in vectors["events"]:
        fields = json.loads(vector["payload"])
        for name in ("agent", "seq", "prev"):
            fields.pop(name)
        kind = fields.pop("kind")
        event = signer.sign(kind, **fields)
        assert event.payload == vector["payload"].encode()
        assert pae("application/vnd.custos.event+json", event.payload).hex() == vector["pae_hex"]
        assert event.envelope == vector["envelope"]
    # The chain: the second vector's prev is the first payload's blake3.
    second = json.loads(vectors["events"][1]["payload"])
    assert second["prev"] == blake3.blake3(vectors["events"][0]["payload"].encode()).hexdigest()


def test_payload_encoding_refuses_what_the_node_refuses():
    base = {"agent": "did:key:z", "seq": 0, "prev": None, "ts": "2026-01-15T09:30:00Z", "realm": "eng"}
    for bad, code_text in [
        ({"kind": "teleport"}, "kind"),
        ({"kind": "tool_call", "realm": "e ng"}, "realm"),
        ({"kind": "tool_call", "outcome": "maybe"}, "outcome"),
        ({"kind": "tool_call", "tokens_in": -1}, "tokens_in"),
        ({"kind": "tool_call", "trace_id": "XYZ"}, "trace_id"),
        ({"kind": "tool_call", "colour": "red"}, "unknown"),
    ]:
        with pytest.raises(CustosError) as error:
            encode({**base, **bad})
        assert error.value.code == "bad_payload" and code_text in error.value.message


def test_attrs_keep_their_order_and_non_ascii_is_kept():
    body = encode({"agent": "a", "seq": 1, "prev": "p", "ts": "t", "realm": "eng", "kind": "tool_call",
                   "attrs": {"z": 1, "a": {"y": "é", "b": 2}}})
    assert body == '{"agent":"a","seq":1,"prev":"p","ts":"t","realm":"eng","kind":"tool_call","attrs":{"z":1,"a":{"y":"é","b":2}}}'.encode()


def test_a_tampered_envelope_does_not_open(vectors):
    envelope = json.loads(vectors["events"][0]["envelope"])
    did = vectors["agent"]["did"]
    assert open_envelope(envelope, "application/vnd.custos.event+json", did) == vectors["events"][0]["payload"].encode()
    altered = dict(envelope, payload=base64.b64encode(vectors["events"][0]["payload"].replace("512", "513").encode()).decode())
    with pytest.raises(CustosError) as error:
        open_envelope(altered, "application/vnd.custos.event+json", did)
    assert error.value.code == "bad_signature"
    with pytest.raises(CustosError) as error:
        open_envelope(envelope, "application/vnd.custos.revocations+json", did)
    assert error.value.code == "bad_payload_type"
    other = AgentKey.from_seed(b"\x07" * 32).did
    with pytest.raises(CustosError) as error:
        open_envelope(envelope, "application/vnd.custos.event+json", other)
    assert error.value.code == "wrong_signer"


def test_key_files_are_the_clis_and_owner_only(tmp_path):
    key = AgentKey.generate()
    path = tmp_path / "agent.key"
    key.save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert AgentKey.load(path).did == key.did
    with pytest.raises(CustosError) as error:
        key.save(path)
    assert error.value.code == "key_exists"
    os.chmod(path, 0o644)
    with pytest.raises(CustosError) as error:
        AgentKey.load(path)
    assert error.value.code == "key_permissions"


def test_the_chain_survives_a_crash_between_keeping_and_advancing(tmp_path):
    key = AgentKey.from_seed(b"\x05" * 32)
    path = tmp_path / "agent.key"
    key.save(path)
    signer = Signer.open(str(path), "eng")
    first = signer.sign("tool_call", action="a")
    chain = (tmp_path / "agent.key.chain.json").read_text()
    second = signer.sign("tool_call", action="b")
    # As if the process died after keeping `second` but before saving the chain past it.
    (tmp_path / "agent.key.chain.json").write_text(chain)
    again = Signer.open(str(path), "eng")
    assert again.pending() == [first.envelope, second.envelope]
    third = again.sign("tool_call", action="c")
    assert third.seq == 2
    assert json.loads(third.payload)["prev"] == blake3.blake3(second.payload).hexdigest()
    again.answered([first.envelope, second.envelope])
    assert Signer.open(str(path), "eng").pending() == [third.envelope]


def test_every_otel_mapping_case(mapping_cases):
    for case in mapping_cases:
        assert map_span(case["span"]) == case["event"], case["name"]
