"""Custos SDK: sign agent events, send them, and obey the node's revocations.

    from custos_sdk import AgentKey, Signer, Client, EnforcementFeed
"""

from .client import Client, Result
from .dsse import EVENT_PAYLOAD_TYPE, REVOCATIONS_PAYLOAD_TYPE, open_envelope, pae, sign_envelope
from .errors import CustosError
from .feed import EnforcementFeed
from .key import AgentKey, did_from_public_key, public_key_from_did
from .signer import SignedEvent, Signer

__all__ = [
    "AgentKey", "Client", "CustosError", "EVENT_PAYLOAD_TYPE", "EnforcementFeed",
    "REVOCATIONS_PAYLOAD_TYPE", "Result", "SignedEvent", "Signer", "did_from_public_key",
    "open_envelope", "pae", "public_key_from_did", "sign_envelope",
]
__version__ = "0.1.0"
