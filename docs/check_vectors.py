#!/usr/bin/env python3
"""Checks docs/protocol-vectors.json with an independent implementation
(Python's `cryptography`): HKDF-SHA256 direction keys and AES-128-GCM envelopes."""
import json
import pathlib
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

v = json.loads((pathlib.Path(__file__).parent / "protocol-vectors.json").read_text())
key = bytes.fromhex(v["device_key"])


def derive(info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=info).derive(key)


up, down = derive(b"ecowatt/v1 up"), derive(b"ecowatt/v1 down")
assert up.hex().upper() == v["up_key"], "up key"
assert down.hex().upper() == v["down_key"], "down key"

for name, k in (("request", up), ("answer", down)):
    m = v[name]
    header = bytes.fromhex(m["header"])
    # nonce: direction byte, three zero bytes, counter (the header's last 8 bytes)
    nonce = bytes([header[2], 0, 0, 0]) + header[8:16]
    assert nonce.hex().upper() == m["nonce"], f"{name} nonce"
    aad = header + (m["answers_counter"].to_bytes(8, "big") if "answers_counter" in m else b"")
    assert aad.hex().upper() == m["aad"], f"{name} aad"
    sealed = header + AESGCM(k).encrypt(nonce, bytes.fromhex(m["plaintext"]), aad)
    assert sealed.hex().upper() == m["envelope"], f"{name} envelope"
    opened = AESGCM(k).decrypt(nonce, bytes.fromhex(m["envelope"])[16:], aad)
    assert opened.hex().upper() == m["plaintext"], f"{name} opens"

print("protocol vectors: 2 envelopes and 2 keys match (python cryptography)")
sys.exit(0)
