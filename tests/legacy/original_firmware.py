"""The original (seed) firmware's data path, ported line by line from its
C++ (PIO/ECOWATT/src/application/compression.cpp, security.cpp and
main.cpp of the original system at its "phase 4 done" commit) so that the
migration test sends exactly what an unmodified device sends. Nothing here
comes from EcoWatt's code.
"""

import base64
import hashlib
import hmac
import json

# keys.h: the pre-shared keys every device of the original line carries.
PSK_HMAC = bytes([
    0x2b, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6, 0xab, 0xf7, 0x15, 0x88, 0x09, 0xcf, 0x4f, 0x3c,
    0x76, 0x2e, 0x71, 0x60, 0xf3, 0x8b, 0x4d, 0xa5, 0x6a, 0x78, 0x4d, 0x90, 0x45, 0x19, 0x0c, 0xfe,
])

# RegID order and the starting dictionary (initializeSensorDictionary).
REGISTER_NAMES = ["Vac1", "Iac1", "Fac1", "Vpv1", "Vpv2", "Ipv1", "Ipv2", "Temp", "Pow", "Pac"]
DICTIONARY = [
    [2400, 170, 50, 400, 380, 70, 65, 550, 4000, 4200],
    [2380, 100, 50, 200, 180, 30, 25, 520, 2000, 2500],
    [2450, 200, 50, 450, 420, 90, 85, 580, 5000, 5200],
    [2430, 165, 50, 350, 350, 70, 65, 545, 4100, 4150],
]
TYPE_ID = [1, 2, 3, 4, 4, 5, 5, 6, 7, 7]          # getRegisterTypeId
TOLERANCE = {1: 10, 2: 5, 3: 1, 4: 15, 5: 3, 6: 5, 7: 50, 0: 0}   # getTypeTolerances
BITS = {1: 12, 2: 8, 3: 6, 4: 9, 5: 7, 6: 10, 7: 13, 0: 16}      # getBitsForType


def u8(x):
    return x & 0xFF


def i16(x):
    """C's conversion to int16_t."""
    x &= 0xFFFF
    return x - 0x10000 if x & 0x8000 else x


class Compressor:
    """DataCompression's static state and methods."""

    def __init__(self):
        self.dictionary = [list(p) for p in DICTIONARY]
        self.recent = [[0] * 10 for _ in range(8)]   # temporalBuffer.recentSamples
        self.write_index = 0
        self.buffer_full = False
        self.last_registers = None

    def closest(self, data, selection):               # findClosestDictionaryPattern
        best, best_d = -1, None
        for i, p in enumerate(self.dictionary):
            d = sum(abs(v - p[r]) for v, r in zip(data, selection))
            if best_d is None or d < best_d:
                best, best_d = i, d
        return best if best_d // len(data) < 200 else -1

    def dictionary_method(self, data, selection):     # compressWithDictionary
        m = self.closest(data, selection)
        if m < 0:
            return self.binary(data)
        out = [0xD0, m, u8(len(data))]
        mask, deltas = 0, []
        for i, (v, r) in enumerate(zip(data, selection)):
            delta = i16(i16(v) - i16(self.dictionary[m][r]))
            if delta != 0:
                # (1 << i) is a 32-bit int shifted by i mod 32 on the ESP32,
                # then truncated to the 16-bit mask.
                mask |= (1 << (i % 32)) & 0xFFFF
                deltas.append(delta)
        out += [mask & 0xFF, (mask >> 8) & 0xFF]
        for d in deltas:
            if -127 <= d <= 127:
                b = 0x80 | (u8(d) & 0x7F)
                if d < 0:
                    b |= 0x40
                out.append(b)
            else:
                out += [0x00, u8(d), u8(d >> 8)]
        return out

    def temporal_method(self, data, selection):       # compressWithTemporalDelta
        n = len(data)
        compatible = self.buffer_full and self.last_registers == list(selection)
        if not compatible:
            out = [0x70, u8(n)] + [r for r in selection]
            for v in data:
                out += [u8(v), u8(v >> 8)]
        else:
            out = [0x71, u8(n)]
            p1 = self.recent[(self.write_index - 1) % 8]
            p2 = self.recent[(self.write_index - 2) % 8]
            for v, r in zip(data, selection):
                predicted = 2 * p1[r] - p2[r]
                if predicted < 0 or predicted > 65535:
                    predicted = p1[r]
                delta = i16(i16(v) - i16(predicted))
                if -63 <= delta <= 63:
                    b = (abs(delta) & 0x3F) | 0x80
                    if delta < 0:
                        b |= 0x40
                    out.append(b)
                elif -127 <= delta <= 127:
                    out += [0x00, u8(delta)]
                else:
                    out += [0x01, u8(delta), u8(delta >> 8)]
        for v, r in zip(data, selection):
            self.recent[self.write_index][r] = v
        self.last_registers = list(selection)
        self.write_index = (self.write_index + 1) % 8
        if self.write_index == 0:
            self.buffer_full = True
        return out

    def semantic_method(self, data, selection):       # compressWithSemanticRLE
        out = [0x50, u8(len(data))]
        groups = []
        for i, (v, r) in enumerate(zip(data, selection)):
            t = TYPE_ID[r]
            for g in groups:
                if g["t"] == t:
                    g["v"].append(v)
                    g["p"].append(i)
                    break
            else:
                groups.append({"t": t, "v": [v], "p": [i]})
        out.append(len(groups))
        for g in groups:
            out += [g["t"], u8(len(g["v"]))] + [u8(p) for p in g["p"]]
            i = 0
            while i < len(g["v"]):
                cur, run = g["v"][i], 1
                while i + run < len(g["v"]) and run < 255 and abs(g["v"][i + run] - cur) <= TOLERANCE[g["t"]]:
                    run += 1
                if BITS[g["t"]] <= 8:
                    out += [u8(cur), run]
                else:
                    out += [u8(cur), u8(cur >> 8), run]
                i += run
        return out

    def binary(self, data):                           # compressBinary
        bits = 1
        while (1 << bits) <= max(data):
            bits += 1
        n = len(data)
        if 8 <= bits < 16:
            packed = self.bit_packed(data, bits)
            if len(packed) < 2 * n:
                return packed
        if n <= 8:
            return [b for v in data for b in (u8(v), u8(v >> 8))]
        return [0x00, u8(n)] + [b for v in data for b in (u8(v), u8(v >> 8))]

    @staticmethod
    def bit_packed(data, bits):                       # compressBinaryBitPacked + packBitsIntoBuffer
        n = len(data)
        buf = [0] * ((n * bits + 7) // 8)
        offset = 0
        for v in data:
            v &= (1 << bits) - 1
            byte, pos = offset // 8, offset % 8
            if pos + bits <= 8:
                buf[byte] |= u8(v << (8 - pos - bits))
            else:
                first = 8 - pos
                rest = bits - first
                buf[byte] |= u8(v >> rest)
                if rest <= 8:
                    buf[byte + 1] |= u8((v & ((1 << rest) - 1)) << (8 - rest))
                else:
                    # A negative shift on the ESP32 (Xtensa `ssl`: the amount
                    # mod 32) puts the low bits out of the byte: nothing lands.
                    pass
            offset += bits
        header = [0x01, bits, u8(n)] if (n > 8 or len(buf) + 3 < 2 * n) else []
        return header + buf

    def update_dictionary(self, data, selection):     # updateDictionary
        if len(self.dictionary) < 15 and self.closest(data, selection) < 0:
            p = [0] * 10
            for v, r in zip(data, selection):
                p[r] = v
            self.dictionary.append(p)

    def compress(self, data, selection):              # compressWithSmartSelection
        results = [
            self.dictionary_method(data, selection),
            self.temporal_method(data, selection),
            self.semantic_method(data, selection),
            self.binary(data),
        ]
        best = results[0]
        for r in results:
            if 0 < len(r) < len(best):
                best = r
        self.update_dictionary(data, selection)
        return best


def firmware_base64(data):
    """convertBinaryToBase64: encodes the last partial group as if padded
    with zero bytes and adds no '=' (a decoder sees up to two zero bytes
    more)."""
    chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = []
    for i in range(0, len(data), 3):
        v = data[i] << 16
        if i + 1 < len(data):
            v |= data[i + 1] << 8
        if i + 2 < len(data):
            v |= data[i + 2]
        out += [chars[(v >> 18) & 63], chars[(v >> 12) & 63], chars[(v >> 6) & 63], chars[v & 63]]
    return "".join(out)


def upload_json(device_id, millis, entries):
    """uploadSmartCompressedDataToCloud's JSON. `entries`: (binary, millis, registers)."""
    return json.dumps({
        "device_id": device_id,
        "timestamp": millis,
        "data_type": "compressed_sensor_batch",
        "total_samples": len(entries),
        "register_mapping": {str(i): REGISTER_NAMES[i] for i in range(10)},
        "compressed_data": [
            {
                "compressed_binary": firmware_base64(binary),
                "decompression_metadata": {
                    "method": "BATCH", "register_count": len(regs), "original_size_bytes": 100,
                    "compressed_size_bytes": len(binary), "timestamp": t, "register_layout": regs,
                },
                "performance_metrics": {"academic_ratio": len(binary) / 100.0, "lossless_verified": True},
            }
            for binary, t, regs in entries
        ],
    }, separators=(",", ":"))


def secure(payload, nonce, key=PSK_HMAC):
    """SecurityLayer::securePayload (encryption off, as the firmware ships)."""
    mac = hmac.new(key, nonce.to_bytes(4, "big") + payload.encode(), hashlib.sha256).hexdigest()
    return {"nonce": nonce, "payload": base64.b64encode(payload.encode()).decode(), "mac": mac, "encrypted": False}
