#!/usr/bin/env python3
"""Migration test: an unmodified device of the original system, and the
seed guide's own requests and automated suite, against an EcoWatt server
started with --legacy-api.

Every request is built from the guide (shared/seed/phase4-cloud-features.md)
and the original's code (original_firmware.py ports its C++), never from
EcoWatt's. Needs: ECOWATT_BIN (the ecowatt binary) and Python's
`cryptography` package (the original server used it too).

    ECOWATT_BIN=target/debug/ecowatt python3 tests/legacy/migration_test.py
"""

import base64
import hashlib
import hmac
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from cryptography.hazmat.primitives import hashes, padding as sym_padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import original_firmware as fw  # noqa: E402

ECOWATT = os.environ.get("ECOWATT_BIN", "ecowatt")
DEVICE_ID = "ESP32_EcoWatt_Smart"
RESULTS = []


def check(name, condition, detail=""):
    RESULTS.append((name, bool(condition)))
    print(f"{'PASS' if condition else 'FAIL'}  {name}" + ("" if condition else f"\n      {detail}"))
    if not condition:
        raise SystemExit(f"migration test failed at: {name}")


class Server:
    def __init__(self, base):
        self.base = base

    def request(self, method, path, body=None, content_type="application/json", raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None and content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def get(self, path):
        return self.request("GET", path)


def cli(env, *args):
    out = subprocess.run([ECOWATT, *args], env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"ecowatt {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part1_remote_configuration(s):
    print("\n== Part 1: remote configuration (main.cpp checkChanges) ==")
    # The firmware's request: {"device_id", "timestamp": millis()}.
    poll = lambda: s.post("/changes", {"device_id": DEVICE_ID, "timestamp": 123456})[1]
    r = poll()
    check("a device added for migration is not told to change its timers", r["Changed"] is False, r)
    st, r = s.post("/config/update", {"device_id": DEVICE_ID, "poll_frequency": 10})
    check("Test 1: /config/update poll_frequency 10", st == 200 and r["status"] == "success", r)
    r = poll()
    check("ChangedResponse as the guide's ESP32 log shows it",
          r["Changed"] is True and r["pollFreqChanged"] is True and r["newPollTimer"] == 10
          and r["uploadFreqChanged"] is False, r)
    r = poll()
    check("the change flag resets after it is sent", r["Changed"] is False and r["newPollTimer"] == 10, r)
    st, r = s.post("/config/update", {"device_id": DEVICE_ID, "upload_frequency": 600})
    r = poll()
    check("Test 2: upload frequency 900 s -> 600 s",
          r["Changed"] and r["uploadFreqChanged"] and r["newUploadTimer"] == 600 and not r["pollFreqChanged"], r)
    # The guide's integration test: curl -d '{...}' with no Content-Type
    # (curl then sends application/x-www-form-urlencoded).
    st, r = s.request("POST", "/config/update", raw=json.dumps({"device_id": DEVICE_ID, "upload_frequency": 600}).encode(),
                      content_type="application/x-www-form-urlencoded")
    check("integration test: /config/update without a JSON Content-Type", st == 200, (st, r))
    st, r = s.get(f"/config/status?device_id={DEVICE_ID}")
    check("troubleshooting: GET /config/status", st == 200 and r["poll_frequency"] == 10 and r["upload_frequency"] == 600, r)


def part2_command_suite(s):
    print("\n== Part 2: flask/test_command_execution.py, its ten tests ==")
    st, r = s.post("/command/queue", {"device_id": DEVICE_ID, "command_type": "set_power", "parameters": {"power_value": 5000}})
    check("Test 1: Queue Command", st == 200 and r.get("command_id"), r)
    cid = r["command_id"]
    check("command ids have the original's CMD_<n>_<unix> form",
          cid.startswith("CMD_") and len(cid.split("_")) == 3 and abs(int(cid.split("_")[2]) - time.time()) < 120, cid)
    st, r = s.post("/command/poll", {"device_id": DEVICE_ID})
    check("Test 2: Poll Command", st == 200 and r["command"]["command_id"] == cid
          and r["command"]["parameters"] == {"power_value": 5000}, r)
    st, r = s.post("/command/result", {"command_id": cid, "status": "completed",
                                        "result": "Command set_power: executed successfully (TEST)"})
    check("Test 3: Submit Result", st == 200, r)
    st, r = s.get(f"/command/status/{cid}")
    check("Test 4: Command Status", st == 200 and r["status"] == "completed", r)
    st, r = s.get(f"/command/history?device_id={DEVICE_ID}&limit=10")
    check("Test 5: Command History", st == 200 and any(c["command_id"] == cid for c in r["commands"]), r)
    st, r = s.get(f"/command/pending?device_id={DEVICE_ID}")
    check("Test 6: Pending Commands", st == 200 and r["count"] == 0, r)
    st, r = s.get("/command/statistics")
    check("Test 7: Statistics", st == 200 and r["total_commands"] == 1 and r["completed"] == 1
          and r["pending"] == 0 and r["success_rate"] == 100.0 and r["active_devices"] == 1
          and r["total_queued"] == 1, r)
    st, r = s.post("/command/queue", {"device_id": DEVICE_ID, "command_type": "write_register",
                                       "parameters": {"register_address": 40001, "value": 4500}})
    check("Test 8: Queue write_register", st == 200 and r.get("command_id"), r)
    cid2 = r["command_id"]
    st, r = s.post("/command/result", {"command_id": cid2, "status": "failed",
                                        "result": "Inverter SIM timeout - command execution failed (TEST)"})
    check("Test 9: Failed Command Result", st == 200, r)
    st, r = s.get(f"/command/logs?device_id={DEVICE_ID}")
    check("Test 10: Export Logs", st == 200 and len(r["logs"]) == 2, r)
    st, r = s.get("/command/statistics")
    check("final statistics", r["total_commands"] == 2 and r["completed"] == 1 and r["failed"] == 1
          and r["success_rate"] == 50.0, r)

    print("\n== Part 2: manual test with the firmware's own command loop ==")
    st, r = s.post("/command/queue", {"device_id": DEVICE_ID, "command_type": "set_power_percentage",
                                       "parameters": {"percentage": 50}})
    # checkForCommands -> executeCommand -> sendCommandResult, as main.cpp does them.
    st, r = s.post("/command/poll", {"device_id": DEVICE_ID})
    cmd = r["command"]
    check("the firmware receives set_power_percentage 50", cmd["command_type"] == "set_power_percentage"
          and cmd["parameters"]["percentage"] == 50, r)
    st, r = s.post("/command/result", {"command_id": cmd["command_id"], "status": "completed",
                                        "result": "Command set_power_percentage: executed successfully"})
    st, r = s.get(f"/command/history?device_id={DEVICE_ID}")
    done = [c for c in r["commands"] if c["command_id"] == cmd["command_id"]][0]
    check("history shows it completed with its times", done["status"] == "completed"
          and done["queued_time"] and done["sent_time"] and done["completed_time"], done)
    st, r = s.post("/command/poll", {"device_id": DEVICE_ID})
    check("no command left to poll", r["command"] is None, r)


def inverter_samples(n, seed):
    """Raw register values as an inverter serves them (the seed's register
    map: Vac1 in 0.1 V, Iac1 0.1 A, Fac1 0.01 Hz, Vpv 0.1 V, Ipv 0.1 A,
    Temp 0.1 degC, Pow %, Pac W): an afternoon with noise and a slow
    decline, then dusk."""
    rnd = random.Random(seed)
    out = []
    for k in range(n):
        if k < n // 2:
            sun = 1.0 - k / n
            pac = int(4200 * sun) + rnd.randint(-25, 25)
            out.append([2400 + rnd.randint(-15, 15), pac * 10 // 2400, 5000 + rnd.randint(-3, 3),
                        int(3600 * sun) + rnd.randint(-10, 10), int(3550 * sun) + rnd.randint(-10, 10),
                        int(60 * sun) + rnd.randint(-2, 2), int(58 * sun) + rnd.randint(-2, 2),
                        450 - k // 3 + rnd.randint(-1, 1), 50, pac])
        else:
            out.append([2380 + rnd.randint(-15, 15), rnd.randint(0, 3), 5000 + rnd.randint(-3, 3),
                        rnd.randint(0, 40), rnd.randint(0, 40), 0, 0, 300 - (k - n // 2) // 2, 50, rnd.randint(0, 6)])
    return out


def part3_secured_uploads(s, env, poll_ms=10_000):
    print("\n== Part 3: security layer and uploads (/process) ==")
    c = fw.Compressor()
    samples = inverter_samples(5 * 24, seed=7)
    regs = list(range(10))
    batches, millis = [], 0
    for b in range(len(samples) // 5):
        batch = samples[5 * b:5 * b + 5]
        millis += 5 * poll_ms  # five polls (10 s as set in part 1)
        data = [v for sample in batch for v in sample]
        batches.append((c.compress(data, regs * 5), millis, regs))
    # The device restarts (its encoder state with it), and its first batch
    # holds a failed read: the inverter answered 0xFFFF (the original's
    # fault-injection tests), so the encoder falls back to raw values.
    c, millis = fw.Compressor(), 0
    faults = inverter_samples(5 * 4, seed=8)
    faults[2][9] = 0xFFFF
    for b in range(4):
        batch = faults[5 * b:5 * b + 5]
        millis += 5 * poll_ms
        batches.append((c.compress([v for sample in batch for v in sample], regs * 5), millis, regs))
    samples += faults
    methods = {}
    for binary, _, _ in batches:
        methods[hex(binary[0])] = methods.get(hex(binary[0]), 0) + 1
    print(f"      the original encoder chose: {methods}")
    nonce = 10000
    ups = []
    for u in range(len(batches) // 4):   # 4 batches per upload (the ring buffer drained each cycle)
        nonce += 1
        entries = batches[4 * u:4 * u + 4]
        ups.append(fw.secure(fw.upload_json(DEVICE_ID, entries[-1][1] + 1000, entries), nonce))

    st, r = s.post("/process", ups[0])
    check("uploads are refused until an operator marks the device legacy", st == 403, (st, r))
    cli(env, "device", "legacy", DEVICE_ID, "on")
    stored = 0
    missing = 0
    for i, up in enumerate(ups):
        st, r = s.post("/process", up)
        check(f"secured upload {i + 1} (nonce {up['nonce']}) accepted", st == 200 and r["status"] == "success", r)
        stored += r["total_samples_processed"]
        missing += r["samples_not_decoded"]
    check("every sample is stored or counted as not decodable", stored + missing == len(samples), (stored, missing))
    check("the batch the encoder sent raw is stored", stored >= 5, (stored, missing))
    print(f"      stored {stored} of {len(samples)} samples; {missing} not decodable (the original encoder lost them)")

    st, r = s.post("/process", ups[2])
    check("Test 2 (replay protection): the same nonce again is refused", st == 401, r)
    tampered = dict(ups[-1])
    tampered["nonce"] = ups[-1]["nonce"] + 10
    st, r = s.post("/process", tampered)
    check("a payload whose HMAC does not verify is refused", st == 401, r)
    st, r = s.post("/process", {"device_id": DEVICE_ID, "compressed_data": []})
    check("a payload without the security layer is refused", st == 401, r)

    # What was stored is exactly what the device read, at 5 s intervals.
    token = open(os.path.join(env["ECOWATT_DATA_DIR"], "admin.token")).read().strip()
    req = urllib.request.Request(s.base + f"/api/v1/devices/{DEVICE_ID}/telemetry?max_points=10000"
                                 f"&from_ms={int(time.time() * 1000) - 3600_000}",
                                 headers={"Authorization": f"Bearer {token}"})
    series = json.loads(urllib.request.urlopen(req).read())
    points = series["points"]
    check("the stored samples are visible in EcoWatt's API", len(points) == stored, (len(points), stored))
    check("series carries all ten registers", [r["address"] for r in series["registers"]] == list(range(10)),
          series["registers"])
    # Engineering units back to raw register values (the documented gains).
    gains = [10, 10, 100, 10, 10, 10, 10, 10, 1, 1]
    read = [tuple(round(v * g) for v, g in zip(p["v"], gains)) for p in points]
    by_time = sorted(zip([p["t"] for p in points], read))
    check(f"samples are at least a poll interval ({poll_ms} ms) apart",
          all(b[0] - a[0] >= poll_ms for a, b in zip(by_time, by_time[1:])), by_time[:6])
    original = [tuple(x) for x in samples]
    check("every stored sample is exactly one the device read, in order",
          all(r in original for r in read) and [original.index(r) for _, r in by_time]
          == sorted(original.index(r) for r in read), read[:3])


def part4_ota(s, env, keys, workdir):
    print("\n== Part 4: FOTA with the original's OTAManager ==")
    private_key, aes_key, hmac_psk = keys
    image = bytes((i * 31 + 7) % 256 for i in range(50_000))
    with open(os.path.join(workdir, "firmware_1.0.4.bin"), "wb") as f:
        f.write(image)
    cli(env, "firmware", "sign", "firmware_1.0.4.bin", "--version", "1.0.4", "--key", "server_private_key.pem",
        "--legacy", "--target", "esp32-original")
    cli(env, "firmware", "upload", "firmware_1.0.4.bin")
    st, r = s.post("/ota/check", {"device_id": DEVICE_ID})
    check("/ota/check without current_version is a 400", st == 400, (st, r))
    st, r = s.post("/ota/check", {"device_id": DEVICE_ID, "current_version": "1.0.3"})
    check("no update before the operator rolls it out", st == 200 and r["update_available"] is False, r)
    cli(env, "rollout", "start", "--version", "1.0.4", "--devices", DEVICE_ID)

    st, m = s.post("/ota/check", {"device_id": DEVICE_ID, "current_version": "1.0.3"})
    check("checkForUpdates: update 1.0.4 with the OTAManager's manifest fields",
          st == 200 and m["update_available"] and m["version"] == "1.0.4"
          and all(k in m for k in ["original_size", "encrypted_size", "total_chunks", "chunk_size",
                                   "sha256_hash", "signature", "iv"]), m)
    iv = base64.b64decode(m["iv"])
    decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).decryptor()
    plain = b""
    for n in range(m["total_chunks"]):
        st, r = s.post("/ota/chunk", {"device_id": DEVICE_ID, "version": "1.0.4", "chunk_number": n})
        chunk = base64.b64decode(r["chunk"]["data"])
        mac = hmac.new(hmac_psk.encode(), chunk + str(n).encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac, r["chunk"]["hmac"]):
            check(f"chunk {n} HMAC", False, r)
        plain += decryptor.update(chunk)
        if n == 3:
            # A chunk changed in transit fails the device's HMAC check.
            bad = bytes([chunk[0] ^ 1]) + chunk[1:]
            bad_mac = hmac.new(hmac_psk.encode(), bad + str(n).encode(), hashlib.sha256).hexdigest()
            check("a tampered chunk fails the chunk HMAC", bad_mac != r["chunk"]["hmac"])
    plain += decryptor.finalize()
    unpadder = sym_padding.PKCS7(128).unpadder()
    plain = unpadder.update(plain) + unpadder.finalize()
    check("every chunk's HMAC verified; the decrypted image is the uploaded one", plain == image)
    digest = hashlib.sha256(plain).digest()
    check("sha256_hash matches", digest.hex() == m["sha256_hash"], m["sha256_hash"])
    private_key.public_key().verify(base64.b64decode(m["signature"]), digest, padding.PKCS1v15(),
                                    Prehashed(hashes.SHA256()))
    check("RSA-2048 signature verified as verifyRSASignature does (mbedtls_pk_verify over the hash)", True)
    st, r = s.post("/ota/chunk", {"device_id": DEVICE_ID, "version": "1.0.4", "chunk_number": m["total_chunks"]})
    check("a chunk out of range: 404", st == 404, (st, r))
    # Update.end(true), ESP.restart(), then the post-OTA diagnostics.
    st, r = s.get("/ota/status")
    check("post-OTA diagnostics: GET /ota/status answers 200", st == 200, (st, r))
    st, r = s.post("/ota/check", {"device_id": DEVICE_ID, "current_version": "1.0.4"})
    check("after the reboot: no update for 1.0.4", r["update_available"] is False, r)
    out = cli(env, "rollout", "show", "1")
    check("the rollout reports the device succeeded", any(DEVICE_ID in l and "succeeded" in l for l in out.splitlines()), out)


def wait_healthy(s):
    for _ in range(400):
        try:
            with urllib.request.urlopen(s.base + "/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("the server did not start")


def main():
    workdir = tempfile.mkdtemp(prefix="ecowatt-migration-")
    data_dir = os.path.join(workdir, "data")
    # The original's keys (flask/generate_keys.py): RSA-2048 in PKCS#8 PEM,
    # a 32-byte AES key, a text HMAC_PSK.
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with open(os.path.join(workdir, "server_private_key.pem"), "wb") as f:
        f.write(private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    modulus = private_key.public_key().public_numbers().n.to_bytes(256, "big").hex()
    aes_key = secrets.token_bytes(32)
    hmac_psk = secrets.token_hex(32)
    port = free_port()
    config = os.path.join(workdir, "server.toml")
    with open(config, "w") as f:
        f.write(f'legacy_api = true\nfirmware_keys = ["{modulus}"]\n\n[legacy]\n'
                f'ota_aes_key = "{aes_key.hex()}"\nota_hmac_psk = "{hmac_psk}"\n')
    env = dict(os.environ, ECOWATT_SERVER=f"http://127.0.0.1:{port}", ECOWATT_DATA_DIR=data_dir)
    log = open(os.path.join(workdir, "server.log"), "w")
    server = subprocess.Popen([ECOWATT, "server", "--config", config, "--data-dir", data_dir,
                               "--bind", f"127.0.0.1:{port}"], stdout=log, stderr=log, cwd=workdir)
    try:
        s = Server(f"http://127.0.0.1:{port}")
        wait_healthy(s)
        os.chdir(workdir)
        cli(env, "device", "add", DEVICE_ID)
        part1_remote_configuration(s)
        part2_command_suite(s)
        part3_secured_uploads(s, env)
        part4_ota(s, env, (private_key, aes_key, hmac_psk), workdir)
    finally:
        server.terminate()
        server.wait(timeout=10)
    print("=" * 60)
    print(f"ALL TESTS COMPLETED: {sum(ok for _, ok in RESULTS)} of {len(RESULTS)} passed")
    print("=" * 60)


if __name__ == "__main__":
    main()
