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



def decode_batch(data: bytes):
    """An independent decoder of telemetry codec v1 (docs/protocol.md)."""
    at = 0

    def varint():
        nonlocal at
        v = shift = 0
        while True:
            b = data[at]
            at += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return v

    def column(n):
        out = []
        while len(out) < n:
            t = varint()
            out += [0] * (t >> 1) if t & 1 else [t >> 1]
        assert len(out) == n, "run past the column"
        return out

    def unzigzag(v):
        return (v >> 1) ^ -(v & 1)

    assert data[0] == 1
    mask = int.from_bytes(data[1:3], "big")
    at = 3
    count, seq, ms = varint(), varint(), varint()
    seqs, times = [seq], [ms]
    for gap in column(count - 1):
        seqs.append(seqs[-1] + gap + 1)
    delta = 0
    for dod in column(count - 1):
        delta += unzigzag(dod)
        times.append(times[-1] + delta)
    cols = []
    for _ in range(bin(mask).count("1")):
        v = [varint()]
        for d in column(count - 1):
            v.append(v[-1] + unzigzag(d))
        cols.append(v)
    assert at == len(data), "trailing bytes"
    return mask, [[seqs[i], times[i]] + [c[i] for c in cols] for i in range(count)]


cb = v["codec_batch"]
mask, rows = decode_batch(bytes.fromhex(cb["encoded"]))
assert mask == int(cb["registers"], 16) and rows == cb["samples"], (mask, rows)

print("protocol vectors: 2 envelopes, 2 keys (python cryptography) and a codec batch match")
sys.exit(0)
