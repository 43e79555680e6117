#!/usr/bin/env python3
"""EcoWatt fault-injection suite: the real binaries, real faults, and a count
of what was lost.

Each scenario runs a small fleet (an `ecowatt sim` with three inverters, an
`ecowatt server`, three `ecowatt device` agents sampling every second and
uploading every 10 s, an operator queueing a command every few seconds),
injects one fault, lets the fleet settle, then checks:

- samples: every `seq` a device had acknowledged (its log says
  `telemetry uploaded acked_through=N`) is stored, none twice
  (`/completeness`: missing, duplicates);
- commands: every command queued reached an end state, and none was executed
  twice (the simulator keeps the values written to the export limit, and
  each command writes a value of its own);
- recovery: how long after the fault ended the fleet was whole again, and
  what a user saw meanwhile.

It exits 1 if anything acknowledged was lost or duplicated, or a check failed.
Some scenarios need root (a tmpfs for the full disk, network namespaces and
nftables for packet loss) or PostgreSQL (`psql`); without them they say so
and are skipped. Standard library only.

    python3 tests/faults/run.py --bin target/debug/ecowatt            # every scenario
    python3 tests/faults/run.py --bin ... --quick                      # shorter phases (CI)
    python3 tests/faults/run.py --bin ... --only server-kill-9,outage  # some
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime

ANSI = re.compile(r"\x1b\[[0-9;]*m")
UPLOADED = re.compile(r"^(\S+)\s.*telemetry uploaded.*acked_through=(\d+).*backlog=(\d+)")
DEVICES = 5
FIRST_SLAVE = 0x11


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, token=None, body=None, timeout=10):
    """(status, parsed JSON or text); status 0 when the server is unreachable."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0, None
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def ts(line):
    """The UTC time a log line was written, as Unix seconds."""
    try:
        return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
    except (ValueError, IndexError):
        return None


class Proc:
    """A child process whose output goes to a log file."""

    def __init__(self, name, args, log_path, env=None, ns=None):
        self.name, self.args, self.log_path, self.ns = name, args, log_path, ns
        self.env = {**os.environ, "NO_COLOR": "1", **(env or {})}
        self.p = None

    def start(self):
        cmd = (["ip", "netns", "exec", self.ns] if self.ns else []) + self.args
        self.out = open(self.log_path, "ab")
        self.p = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, env=self.env)
        return self

    def signal(self, sig):
        if self.p and self.p.poll() is None:
            self.p.send_signal(sig)

    def wait(self, timeout):
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        if self.p and self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            if self.wait(10) is None:
                self.p.kill()
                self.p.wait()
        if self.p and not self.out.closed:
            self.out.close()

    def lines(self):
        try:
            with open(self.log_path, "rb") as f:
                return [ANSI.sub("", l.decode(errors="replace")) for l in f]
        except FileNotFoundError:
            return []


LIVE = []  # every fleet of the scenario running, stopped when it ends however it ends


class Fleet:
    """Simulator, server, agents and the operator's command stream."""

    def __init__(self, bin, work, database=None, ns=None, server_host="127.0.0.1", data_dir=None):
        LIVE.append(self)
        self.bin, self.work, self.database, self.ns = bin, work, database, ns
        self.data_dir = data_dir or os.path.join(work, "server")
        self.port = free_port()
        self.bind = f"{server_host}:{self.port}"
        self.url = f"http://{self.bind}"
        self.server = None
        self.agents = []
        self.commands = []  # (device index, id, value)
        self.queue_refused = 0
        self.stop_commands = threading.Event()

    # --- server
    def start_server(self, wait=True):
        args = [self.bin, "server", "--bind", self.bind, "--data-dir", self.data_dir]
        if self.database:
            args += ["--database", self.database]
        self.server = Proc("server", args, os.path.join(self.work, "server.log"),
                           env={"RUST_LOG": "warn,ecowatt_server=info"}).start()
        if wait:
            self.wait_healthy(30)
            self.token = open(os.path.join(self.data_dir, "admin.token")).read().strip()
        return self.server

    def wait_healthy(self, limit):
        t0 = time.time()
        while time.time() - t0 < limit:
            if http("GET", f"{self.url}/healthz", timeout=2)[0] == 200:
                return time.time() - t0
            if self.server.p.poll() is not None:
                raise RuntimeError(f"the server exited: {self.server.lines()[-5:]}")
            time.sleep(0.1)
        raise RuntimeError("the server did not become healthy")

    def api(self, method, path, body=None):
        return http(method, f"{self.url}{path}", self.token, body)

    # --- devices
    def start_devices(self):
        sim_http, sim_tcp = free_port(), free_port()
        self.sim = Proc("sim", [self.bin, "sim", "--inverters", str(DEVICES), "--http",
                                f"127.0.0.1:{sim_http}", "--modbus-tcp", f"127.0.0.1:{sim_tcp}"],
                        os.path.join(self.work, "sim.log"), ns=self.ns).start()
        self.sim_url = f"http://127.0.0.1:{sim_http}"
        time.sleep(0.5)
        for i in range(DEVICES):
            name = f"dev-{i}"
            status, v = self.api("POST", "/api/v1/devices", {"name": name, "rated_power_w": 10000})
            assert status == 201, (status, v)
            prov = os.path.join(self.work, f"{name}.provision.json")
            with open(prov, "w") as f:
                json.dump(v["provisioning"], f)
            status, v = self.api("PATCH", f"/api/v1/devices/{name}/config",
                                 {"poll_interval_ms": 1000, "upload_interval_ms": 10000})
            assert status == 200, (status, v)
            self.agents.append(self.agent(i))
        for a in self.agents:
            a.start()
        threading.Thread(target=self._operator, daemon=True).start()

    def agent(self, i):
        return Proc(f"dev-{i}", [self.bin, "device", "--provision",
                                 os.path.join(self.work, f"dev-{i}.provision.json"),
                                 "--inverter", self.sim_url, "--slave", hex(FIRST_SLAVE + i),
                                 "--state-dir", os.path.join(self.work, f"state-{i}"),
                                 "--cloud", self.url],
                    os.path.join(self.work, f"dev-{i}.log"),
                    env={"RUST_LOG": "warn,ecowatt_device=info"}, ns=self.ns)

    def sim_state(self):
        if self.ns:
            out = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c",
                                  "import urllib.request,sys;print(urllib.request.urlopen(sys.argv[1]).read().decode())",
                                  f"{self.sim_url}/api/sim/state"], capture_output=True, text=True)
            return json.loads(out.stdout)
        return http("GET", f"{self.sim_url}/api/sim/state")[1]

    def _operator(self, every=3.0):
        """Queues a command every `every` seconds, round robin, each with a
        value of its own (the value is how the simulator tells executions apart)."""
        n = 0
        while not self.stop_commands.wait(every):
            device = n % DEVICES
            value = 1 + (n // DEVICES) % 99
            status, v = self.api("POST", f"/api/v1/devices/dev-{device}/commands",
                                 {"type": "set_power_percentage", "parameters": {"percentage": value}})
            if status == 201:
                self.commands.append((device, v["id"], value))
            else:
                self.queue_refused += 1
            n += 1

    # --- the settled fleet
    def uploads(self, i):
        """(time, acked_through, backlog) of every upload agent `i` logged."""
        out = []
        for line in self.agents[i].lines():
            m = UPLOADED.match(line)
            if m:
                out.append((ts(line), int(m.group(2)), int(m.group(3))))
        return out

    def first_upload_after(self, t, devices=None):
        """Seconds from `t` until every device (or those given) has an upload acknowledged."""
        times = []
        for i in devices if devices is not None else range(DEVICES):
            after = [u[0] for u in self.uploads(i) if u[0] and u[0] >= t]
            if not after:
                return None
            times.append(min(after) - t)
        return max(times)

    def settle(self, since, limit=120):
        """Waits until every device uploaded after `since` with a small
        backlog and every command ended; returns the seconds it took."""
        self.stop_commands.set()
        t0 = time.time()
        while time.time() - t0 < limit:
            drained = all(any(u[0] and u[0] >= since and u[2] <= 15 for u in self.uploads(i))
                          for i in range(DEVICES))
            open_cmds = self.open_commands()
            if drained and not open_cmds:
                return time.time() - since
            time.sleep(1)
        return None

    def open_commands(self):
        status, v = self.api("GET", "/api/v1/commands?limit=1000")
        if status != 200:
            return ["?"]
        return [c["id"] for c in v["commands"] if c["status"] in ("queued", "delivered")]

    def check(self):
        """What was lost or duplicated, per the module documentation."""
        r = {"acked": 0, "lost": 0, "duplicated": 0, "dropped": 0}
        for i in range(DEVICES):
            ups = self.uploads(i)
            acked = max((u[1] for u in ups), default=0)
            status, c = self.api("GET", f"/api/v1/devices/dev-{i}/completeness")
            assert status == 200, (status, c)
            lost = sum(max(0, min(b, acked) - a + 1) for a, b in c["gaps"] if a <= acked)
            if c["last_seq"] is None or c["last_seq"] < acked:
                lost += acked - (c["last_seq"] or 0)
            lost += max(0, (c["first_seq"] or 1) - 1) if acked else 0
            r["acked"] += acked
            r["lost"] += lost
            r["duplicated"] += c["duplicates"]
            r["dropped"] += c["dropped_reported"]
        status, v = self.api("GET", "/api/v1/commands?limit=1000")
        statuses = {}
        for c in v["commands"]:
            statuses[c["status"]] = statuses.get(c["status"], 0) + 1
        r["commands"] = len(self.commands)
        r["command_statuses"] = statuses
        r["commands_open"] = statuses.get("queued", 0) + statuses.get("delivered", 0)
        r["queue_refused"] = self.queue_refused
        sim = self.sim_state()
        twice = 0
        for i in range(DEVICES):
            writes = sim["inverters"][i]["limit_writes"]
            for value in {v for d, _, v in self.commands if d == i}:
                twice += max(0, writes.count(value) - 1)
        r["executed_twice"] = twice
        return r

    def warnings(self, pattern):
        """How many log lines of the agents match `pattern`."""
        rx = re.compile(pattern)
        return sum(1 for a in self.agents for l in a.lines() if rx.search(l))

    def stop(self):
        self.stop_commands.set()
        for a in self.agents:
            a.stop()
        if getattr(self, "sim", None):
            self.sim.stop()
        if self.server:
            self.server.stop()


# ---------------------------------------------------------------- scenarios

def phase(args, full, quick):
    return quick if args.quick else full


def started(args, work, full, quick, **fleet):
    """A fleet started and left running `full` (or `quick`) seconds before the fault."""
    f = Fleet(args.bin, work, **fleet)
    f.start_server()
    f.start_devices()
    time.sleep(phase(args, full, quick))
    return f


def finish(f, since, devices=None, limit=120):
    """Settles the fleet after a fault that ended at `since`, and checks it:
    the result, and the seconds until every device (or those given) uploaded."""
    settled = f.settle(since, limit)
    back = f.first_upload_after(since, devices)
    result = f.check()
    result["settled_s"] = settled
    result["recovery_s"] = back
    return result, back


def server_kill_9(args, work):
    f = started(args, work, 25, 15)
    f.server.signal(signal.SIGKILL)
    f.server.wait(10)
    killed = time.time()
    code, _ = http("GET", f"{f.url}/api/v1/devices", f.token)
    time.sleep(5)
    f.start_server(wait=False)
    up = f.wait_healthy(30)
    restarted = time.time()
    result, back = finish(f, restarted)
    result["seen"] = (f"kill -9; down {restarted - killed:.0f} s (operator API: "
                      f"{'connection refused' if code == 0 else code}); restart healthy in {up:.1f} s; "
                      f"every device uploading again {back:.1f} s after; "
                      f"{f.warnings('sync failed|upload failed')} agent retry warnings")
    return result


def agent_kill_9(args, work):
    f = started(args, work, 25, 15)
    victim = f.agents[0]
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    time.sleep(5)
    f.agents[0] = f.agent(0)
    f.agents[0].start()
    restarted = time.time()
    result, back = finish(f, restarted, devices=[0])
    result["seen"] = (f"device agent killed -9 and restarted 5 s later; it resumed from its "
                      f"state directory and uploaded {back:.1f} s after the restart")
    return result


def outage(args, work):
    f = started(args, work, 20, 12)
    t0 = time.time()
    f.server.signal(signal.SIGTERM)
    code = f.server.wait(15)
    stopped_in = time.time() - t0
    down = phase(args, 120, 30)
    time.sleep(down)
    f.start_server(wait=False)
    f.wait_healthy(30)
    restarted = time.time()
    result, _ = finish(f, restarted, limit=180)
    settled = result["settled_s"]
    result["recovery_s"] = settled
    result["seen"] = (f"server stopped (SIGTERM: exited {code} in {stopped_in:.1f} s) for {down} s; "
                      f"devices kept sampling and caught up {settled:.0f} s after it was back; "
                      f"commands queued meanwhile: {f.queue_refused} refused (server down)")
    return result


def disk_full(args, work):
    if os.geteuid() != 0:
        return {"skipped": "needs root to mount a small tmpfs"}
    disk = os.path.join(work, "disk")
    os.makedirs(disk)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", disk]).returncode != 0:
        return {"skipped": "cannot mount a tmpfs"}
    try:
        f = started(args, work, 20, 12, data_dir=os.path.join(disk, "data"))
        filler = os.path.join(disk, "filler")
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=64"],
                       capture_output=True)
        full_at = time.time()
        unhealthy, samples = 0, 0
        while time.time() - full_at < phase(args, 30, 20):
            samples += 1
            unhealthy += http("GET", f"{f.url}/healthz")[0] == 503
            time.sleep(1)
        os.remove(filler)
        freed = time.time()
        healthy_in = f.wait_healthy(30)
        result, back = finish(f, freed)
        result["seen"] = (f"disk full for {freed - full_at:.0f} s: /healthz 503 in {unhealthy} of "
                          f"{samples} checks, {f.warnings('upload failed')} upload retries by devices; "
                          f"space freed: healthy in {healthy_in:.1f} s, every device uploading "
                          f"{back:.1f} s after, no restart")
        f.stop()
        return result
    finally:
        subprocess.run(["umount", "-l", disk])


def postgres_terminate(args, work):
    admin = os.environ.get("ECOWATT_TEST_PG_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    if not shutil.which("psql") or subprocess.run(["psql", admin, "-qc", "SELECT 1"],
                                                  capture_output=True).returncode != 0:
        return {"skipped": f"no PostgreSQL at {admin}"}
    name = f"ecowatt_faults_{os.getpid()}"
    subprocess.run(["psql", admin, "-qc", f"CREATE DATABASE {name}"], check=True)
    base = admin.rsplit("/", 1)[0]
    try:
        f = started(args, work, 15, 10, database=f"{base}/{name}")
        storm_until = time.time() + phase(args, 40, 20)
        killed = 0
        while time.time() < storm_until:
            out = subprocess.run(["psql", admin, "-Atc",
                                  f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"],
                                 capture_output=True, text=True)
            killed += int(out.stdout.strip() or 0)
            time.sleep(2)
        result, back = finish(f, time.time())
        result["seen"] = (f"{killed} PostgreSQL connections terminated over "
                          f"{phase(args, 40, 20)} s; {f.warnings('upload failed|sync failed')} "
                          f"device retries; every device uploading {back:.1f} s after the last")
        f.stop()
        return result
    finally:
        subprocess.run(["psql", admin, "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"])


def sqlite_corrupt_start(args, work):
    f = started(args, work, 15, 12)
    f.settle(time.time())
    for a in f.agents:
        a.stop()
    before = f.check()
    f.server.stop()
    db = os.path.join(f.data_dir, "ecowatt.db")
    saved = open(db, "rb").read()
    assert not os.path.exists(db + "-wal") or os.path.getsize(db + "-wal") == 0, \
        "the server folds its log into the database when it stops"
    seen = []
    for what, content, says in [
        ("truncated", saved[: len(saved) // 2], "truncated"),
        ("garbage", b"\x42" * len(saved), "not a SQLite database"),
        ("empty", b"", "missing or empty"),
        ("missing", None, "missing or empty"),
    ]:
        if content is None:
            os.remove(db)
        else:
            open(db, "wb").write(content)
        t0 = time.time()
        p = f.start_server(wait=False)
        code = p.wait(20)
        took = time.time() - t0
        text = "".join(p.lines()[-3:])
        ok = code not in (None, 0) and says in text and took < 5
        seen.append(f"{what}: {'refused' if ok else 'NOT REFUSED'} in {took:.1f} s")
        if not ok:
            raise AssertionError(f"{what}: exit {code} after {took:.1f} s: {text}")
        token = open(os.path.join(f.data_dir, "admin.token")).read().strip()
        assert token == f.token, f"{what}: admin.token was overwritten"
    open(db, "wb").write(saved)
    f.start_server()
    after = f.check()
    result = dict(after)
    result["lost"] = before["acked"] - after["acked"] + after["lost"]
    result["recovery_s"] = None
    result["seen"] = "; ".join(seen) + "; the saved file back: started with everything in it"
    f.server.stop()
    f.sim.stop()
    return result


def network(args, work):
    if os.geteuid() != 0 or not shutil.which("ip"):
        return {"skipped": "needs root and iproute2 for network namespaces"}
    if not shutil.which("nft"):
        return {"skipped": "needs nftables (Debian package nftables) to drop packets"}
    ns, host, peer = f"ewf{os.getpid()}", "ewf-h", "ewf-d"
    run = lambda *c: subprocess.run(c, check=True, capture_output=True)
    subprocess.run(["ip", "link", "del", host], capture_output=True)
    run("ip", "netns", "add", ns)
    try:
        run("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
        run("ip", "link", "set", peer, "netns", ns)
        run("ip", "addr", "add", "10.231.0.1/24", "dev", host)
        run("ip", "link", "set", host, "up")
        run("ip", "-n", ns, "addr", "add", "10.231.0.2/24", "dev", peer)
        run("ip", "-n", ns, "link", "set", peer, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        netem = subprocess.run(["tc", "qdisc", "add", "dev", host, "root", "netem", "delay",
                                "80ms", "40ms", "reorder", "20%"], capture_output=True)
        delay = ("80 ms ± 40 ms delay with 20 % reordering (netem)" if netem.returncode == 0
                 else "no delay or reordering (this kernel has no sch_netem)")
        f = started(args, work, 20, 12, ns=ns, server_host="10.231.0.1")
        loss = 15
        rules = (f"table inet {ns} {{\n"
                 f"  chain in {{ type filter hook input priority 0; "
                 f"iifname \"{host}\" numgen random mod 100 < {loss} drop; }}\n"
                 f"  chain out {{ type filter hook output priority 0; "
                 f"oifname \"{host}\" numgen random mod 100 < {loss} drop; }}\n}}\n")
        subprocess.run(["nft", "-f", "-"], input=rules.encode(), check=True, capture_output=True)
        lossy = phase(args, 60, 30)
        time.sleep(lossy)
        # Then a partition: every packet dropped, both ways.
        partition = phase(args, 30, 15)
        run("nft", "delete", "table", "inet", ns)
        subprocess.run(["nft", "-f", "-"], check=True, capture_output=True,
                       input=rules.replace(f"numgen random mod 100 < {loss} ", "").encode())
        time.sleep(partition)
        run("nft", "delete", "table", "inet", ns)
        result, _ = finish(f, time.time())
        settled = result["settled_s"]
        result["recovery_s"] = settled
        result["seen"] = (f"{loss} % of packets dropped each way for {lossy} s between devices and "
                          f"server, then a {partition} s partition; {delay}; "
                          f"{f.warnings('sync failed|upload failed')} device retries; caught up "
                          f"{settled:.0f} s after the partition ended")
        f.stop()
        return result
    finally:
        subprocess.run(["nft", "delete", "table", "inet", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", host], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


SCENARIOS = {
    "server-kill-9": server_kill_9,
    "agent-kill-9": agent_kill_9,
    "outage": outage,
    "disk-full": disk_full,
    "postgres-terminate": postgres_terminate,
    "sqlite-corrupt-start": sqlite_corrupt_start,
    "network-loss": network,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=os.environ.get("ECOWATT_BIN", "target/debug/ecowatt"))
    ap.add_argument("--quick", action="store_true", help="shorter phases (CI)")
    ap.add_argument("--only", help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    ap.add_argument("--report", help="write the results as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args()
    args.bin = os.path.abspath(args.bin)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    root = tempfile.mkdtemp(prefix="ecowatt-faults-")
    results, failed = {}, []
    for name in names:
        work = os.path.join(root, name)
        os.makedirs(work)
        log(f"{name}: starting")
        try:
            r = SCENARIOS[name](args, work)
        except Exception as e:  # a failed check or a harness error: both fail the run
            r = {"error": f"{type(e).__name__}: {e}"}
        finally:
            for fleet in LIVE:
                fleet.stop()
            LIVE.clear()
        results[name] = r
        bad = ("error" in r or r.get("lost", 0) or r.get("duplicated", 0)
               or r.get("executed_twice", 0) or r.get("commands_open", 0)
               or ("settled_s" in r and r["settled_s"] is None))
        if bad:
            failed.append(name)
        log(f"{name}: {'FAILED' if bad else 'ok'}: {json.dumps(r)}")
    print()
    print("| scenario | samples acknowledged | lost | duplicated | commands (end states) | executed twice | recovery | what a user saw |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "skipped" in r or "error" in r:
            print(f"| {name} | | | | | | | {r.get('skipped') or 'ERROR: ' + r['error']} |")
            continue
        cmds = ", ".join(f"{k} {v}" for k, v in sorted(r["command_statuses"].items()))
        rec = "" if r.get("recovery_s") is None else f"{r['recovery_s']:.1f} s"
        print(f"| {name} | {r['acked']} | {r['lost']} | {r['duplicated']} | {r['commands']} ({cmds}) "
              f"| {r['executed_twice']} | {rec} | {r['seen']} |")
    if args.report:
        with open(args.report, "w") as fh:
            json.dump(results, fh, indent=2)
    if args.keep or failed:
        print(f"\nlogs: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
