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



def read_varint(data: bytes, at: int):
    """An unsigned LEB128 varint at `at`: its value and the offset after it."""
    v = shift = 0
    while True:
        b = data[at]
        at += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, at


def decode_batch(data: bytes):
    """An independent decoder of telemetry codec v1 (docs/protocol.md)."""
    at = 0

    def varint():
        nonlocal at
        v, at = read_varint(data, at)
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


def decode_v2(data: bytes, seen: set):
    """An independent decoder of telemetry codec v2 (docs/protocol.md); `seen`
    collects which block forms occurred."""
    at = 3
    pos = 0  # bit position after the byte header

    def varint():
        nonlocal at
        v, at = read_varint(data, at)
        return v

    def bits(n):
        nonlocal pos
        v = 0
        for _ in range(n):
            byte = data[at + pos // 8]
            v = (v << 1) | ((byte >> (7 - pos % 8)) & 1)
            pos += 1
        return v

    def gamma():
        zeros = 0
        while bits(1) == 0:
            zeros += 1
        return ((1 << zeros) | bits(zeros)) - 1

    def unzigzag(v):
        return (v >> 1) ^ -(v & 1)

    def column(first, n, register):
        """b[1..n] of a column whose b[0] is `first`."""
        max_width, width_bits = (20, 5) if register else (64, 7)
        out, prev, prev2, start = [], first, first, 1
        while start < n:
            length = min(64, n - start)
            if bits(1) == 0:
                seen.add("repeat")
                out += [prev] * length
                prev2 = prev
                start += length
                continue
            model = 0 if bits(1) == 0 else 1 + bits(1)
            assert model < (3 if register else 2), "model"
            seen.add(("level", "delta", "delta of delta")[model])
            center = (prev if model == 0 else 0) + unzigzag(gamma())
            rice, width = bits(1), bits(width_bits)
            if rice:
                seen.add("rice")
                u = []
                for _ in range(length):
                    q = 0
                    while q < 16 and bits(1) == 1:
                        q += 1
                    u.append(bits(max_width) if q == 16 else (q << width) | bits(width))
            else:
                exceptions = gamma()
                where, high = [], 0
                if exceptions:
                    seen.add("exceptions")
                    high = bits(width_bits)
                    where = [bits((length - 1).bit_length()) for _ in range(exceptions)]
                seen.add("packed")
                u = [bits(width) for _ in range(length)]
                for p in where:
                    u[p] |= bits(high) << width
            for x in (center + unzigzag(v) for v in u):
                b = (x, prev + x, 2 * prev - prev2 + x)[model]
                out.append(b)
                prev2, prev = prev, b
            start += length
        return out

    assert data[0] == 2
    mask = int.from_bytes(data[1:3], "big")
    count, seq, ms, period = varint(), varint(), varint(), unzigzag(varint())
    seqs = [seq]
    for gap in column(0, count, False):
        seqs.append(seqs[-1] + gap + 1)
    times = [ms] + [ms + i * period + r for i, r in enumerate(column(0, count, False), 1)]
    cols = []
    for _ in range(bin(mask).count("1")):
        length = bits(5)
        first = 0 if length == 0 else (1 << (length - 1)) | bits(length - 1)
        col = [first] + column(first, count, True)
        assert all(0 <= x <= 0xFFFF for x in col), "register range"
        cols.append(col)
    assert pos // 8 == len(data) - at - (1 if pos % 8 else 0), "trailing bytes"
    if pos % 8:
        assert bits(8 - pos % 8) == 0, "padding"
    return mask, [[seqs[i], times[i]] + [c[i] for c in cols] for i in range(count)]


cb = v["codec_batch"]
mask, rows = decode_batch(bytes.fromhex(cb["encoded"]))
assert mask == int(cb["registers"], 16) and rows == cb["samples"], (mask, rows)

cb2 = v["codec_v2_batch"]
seen = set()
mask, rows = decode_v2(bytes.fromhex(cb2["encoded"]), seen)
assert mask == int(cb2["registers"], 16) and rows == cb2["samples"], (mask, rows)
missing = {"repeat", "level", "delta", "delta of delta", "rice", "packed", "exceptions"} - seen
assert not missing, f"the v2 vector does not exercise {missing}"

fd = v["firmware_delivery"]
token, image, stream = (bytes.fromhex(fd[k]) for k in ("token", "image", "stream"))
fkey = HKDF(algorithm=hashes.SHA256(), length=16, salt=token, info=b"ecowatt/v1 firmware").derive(key)
assert fkey.hex().upper() == fd["key"].upper(), "delivery key"
chunk, at, plain = 1 << fd["chunk_log2"], 0, b""
for index in range((len(image) + chunk - 1) // chunk):
    n = min(chunk, len(image) - index * chunk) + 16
    nonce = bytes(4) + index.to_bytes(8, "big")
    plain += AESGCM(fkey).decrypt(nonce, stream[at : at + n], len(image).to_bytes(8, "big"))
    at += n
assert at == len(stream) and plain == image, "firmware delivery stream"

print("protocol vectors: 2 envelopes, 2 keys (python cryptography), a v1 and a v2 codec batch, an encrypted firmware stream match")
sys.exit(0)
