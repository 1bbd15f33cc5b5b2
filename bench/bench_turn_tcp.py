"""TURN over TCP: relayed ChannelData per second and server CPU per message, ours vs coturn.

One run measures both servers, alternating, with the same load generator
(bench/turn_tcp_loadgen.c, built with gcc and libcrypto at bench time). Each repeat starts
each server afresh; the generator opens N TCP connections (source addresses spread over
several loopback IPs), allocates a UDP relay on each, binds a channel to its own UDP peer
socket on 127.0.0.2, then sends ChannelData for a fixed time per step:

* c2p: client -(TCP, ChannelData padded to 4 bytes)-> server -(UDP)-> peer;
* p2c: peer -(UDP)-> server -(TCP, ChannelData)-> client.

Steps run at fixed offered rates and at saturation ("max": as fast as a bounded number of
messages in flight allows). Reported per server: delivered messages/s and server CPU
(utime+stime of its process tree, /proc) per delivered message, the median over repeats.

    python bench/bench_turn_tcp.py --quick          # sanity check, < 30 s
    python bench/bench_turn_tcp.py --repeats 5 --json tcp.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import statistics
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BENCH_DIR,
    CLK_TCK,
    MAGIC_COOKIE,
    REPO_ROOT,
    ManagedProcess,
    ProcStat,
    SystemCpu,
    all_proc_stats,
    background_cpu_pct,
    busy_pct,
    compile_c,
    free_port,
    load_average,
    machine_info,
    other_cpu_seconds,
    process_tree,
    raise_nofile_limit,
    system_cpu,
    temp_workdir,
    thread_count,
    tree_cpu_seconds,
    udp_drops_where,
    wait_for_stun,
)
from bench_binding import ours_env, parse_rate
from bench_turn import GenSession, wait_for_group

DEFAULT_RATES = "20k,50k,max"
DEFAULT_OURS = (
    "{python} -m stunturn_cli serve --listen {host}:{port} --workers {workers}"
    " --user {user}:{password} --realm {realm} --relay-ip {relay_ip}"
    " --relay-ports {relay_low}-{relay_high} --allow-loopback-peers"
    " --user-quota 0 --ip-quota 0 --total-quota 0 --response-rate 0"
    " --connection-quota 0 --ip-connection-quota 0 --log-level warning"
)
USER, PASSWORD, REALM = "alice", "secret", "bench"
SERVERS = ("coturn", "ours")
DIRECTIONS = ("c2p", "p2c")
DIRECTION_TEXT = {
    "c2p": "client -(TCP)-> server -(UDP)-> peer",
    "p2c": "peer -(UDP)-> server -(TCP)-> client",
}
GEN_OK_FRACTION = 0.98  # fixed-rate step sending below this share of offered = not reached
BACKGROUND_LIMIT_PCT = 5.0  # other processes' CPU during a step (% of one core) worth flagging
QUICK = {  # --quick: a sanity run in well under 30 s
    "rates": "20k,max",
    "step_seconds": 1.0,
    "warmup_seconds": 0.5,
    "allocs": 50,
    "repeats": 1,
    "settle_seconds": 0.2,
    "drain_ms": 300,
    "retry_busy": 0,
}


@dataclass
class Config:
    """Parsed command line."""

    servers: list[str]
    directions: list[str]
    rates: list[int]
    """Offered messages/s per step; 0 = saturation (bounded by ``inflight``)."""
    step_seconds: float
    warmup_seconds: float
    warmup_rate: int
    drain_ms: int
    settle_seconds: float
    allocs: int
    client_hosts: list[str]
    payload: int
    burst: int
    inflight: int
    loss_timeout_ms: int
    repeats: int
    workers: int
    ours_cmd: str
    coturn_bin: str
    host: str
    peer_host: str
    relay_ports: tuple[int, int]
    retry_busy: int
    calibrate: bool
    wait_quiet: float
    quiet_load: float
    quick: bool
    json_path: str | None


# ---------------------------------------------------------------- CLI


def parse_step_rate(text: str) -> int:
    """'max' (or 0) -> 0 (saturation), otherwise like parse_rate ('50k' -> 50000)."""
    t = text.strip().lower()
    return 0 if t in ("max", "0") else parse_rate(t)


def fmt_rate(rate: int) -> str:
    return "max" if rate == 0 else f"{rate:,}"


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_args(argv: Sequence[str] | None) -> Config:
    """Build the Config from argv."""
    cpus = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="sanity run (< 30 s): " + str(QUICK))
    p.add_argument("--servers", default="coturn,ours", help="comma list of: coturn, ours")
    p.add_argument("--directions", default="c2p,p2c", help="c2p and/or p2c")
    p.add_argument("--rates", default=None, help=f"offered msgs/s, 'max' = saturation "
                   f"(default {DEFAULT_RATES})")  # fmt: skip
    p.add_argument("--step-seconds", type=float, default=None, help="send time per step (3)")
    p.add_argument("--warmup-seconds", type=float, default=None, help="per direction (1)")
    p.add_argument("--warmup-rate", type=parse_rate, default=20_000)
    p.add_argument("--drain-ms", type=int, default=None, help="wait for stragglers (500)")
    p.add_argument("--settle-seconds", type=float, default=None, help="pause between steps")
    p.add_argument("--allocs", type=int, default=None, help="TCP connections = allocations (200)")
    p.add_argument("--client-hosts", default="127.0.0.10-17",
                   help="client source IPs: A.B.C.D-E range or comma list")  # fmt: skip
    p.add_argument("--payload", type=int, default=100, help="bytes per ChannelData payload")
    p.add_argument("--burst", type=int, default=16, help="messages per write / GSO send")
    p.add_argument("--inflight", type=int, default=8192, help="messages in flight, at most")
    p.add_argument(
        "--loss-timeout-ms",
        type=int,
        default=500,
        help="p2c: undelivered after this leaves the window",
    )
    p.add_argument("--repeats", type=int, default=None, help="runs per server, alternating (3)")
    p.add_argument("--workers", type=int, default=cpus, help="ours --workers = coturn threads")
    p.add_argument("--ours-cmd", default=DEFAULT_OURS, help="template, see bench/README.md")
    p.add_argument("--coturn-bin", default="turnserver")
    p.add_argument("--host", default="127.0.0.1", help="server address (IPv4 loopback)")
    p.add_argument("--peer-host", default="127.0.0.2", help="peer address (IPv4 loopback)")
    p.add_argument("--relay-ports", default="10000-19999", help="relay port range, both")
    p.add_argument(
        "--retry-busy",
        type=int,
        default=None,
        help="re-run a step up to N times if other processes used > 5%% of a core",
    )
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="skip the generator check against a trivial C relay",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="wait up to S seconds for the 1-min load average to drop below "
        "--quiet-load before measuring",
    )
    p.add_argument("--quiet-load", type=float, default=1.5)
    p.add_argument(
        "--json",
        dest="json_path",
        default=None,
        help="write JSON here ('-' = stdout; the tables then go to stderr)",
    )
    a = p.parse_args(argv)
    return _to_config(a, p)


def expand_hosts(text: str) -> list[str]:
    """'127.0.0.10-13' -> four addresses; 'a,b' -> [a, b]."""
    out: list[str] = []
    for item in _csv(text):
        base, dash, last = item.rpartition("-")
        if dash and base.count(".") == 3 and last.isdigit():
            prefix, _, first = base.rpartition(".")
            out += [f"{prefix}.{i}" for i in range(int(first), int(last) + 1)]
        else:
            out.append(item)
    return out


def _loopback4(host: str) -> bool:
    try:
        return socket.inet_aton(host)[0] == 127 and host.count(".") == 3
    except OSError:
        return False


def _to_config(a: argparse.Namespace, p: argparse.ArgumentParser) -> Config:
    q = QUICK if a.quick else {}

    def pick(name: str, default: Any) -> Any:
        value = getattr(a, name)
        return value if value is not None else q.get(name, default)

    servers, directions = _csv(a.servers), _csv(a.directions)
    if not servers or any(s not in SERVERS for s in servers):
        p.error("--servers takes coturn and/or ours")
    if not directions or any(d not in DIRECTIONS for d in directions):
        p.error("--directions takes c2p and/or p2c")
    hosts = expand_hosts(a.client_hosts)
    if (
        not hosts
        or len(hosts) > 64
        or not all(_loopback4(h) for h in [*hosts, a.host, a.peer_host])
    ):
        p.error("--host, --peer-host and 1-64 --client-hosts must be IPv4 loopback addresses")
    if a.host == a.peer_host:
        p.error("--peer-host must differ from --host (servers refuse peers on their own IP)")
    low, _, high = a.relay_ports.partition("-")
    if not (low.isdigit() and high.isdigit() and 1024 <= int(low) < int(high) <= 65535):
        p.error("--relay-ports must be LOW-HIGH within 1024-65535")
    cfg = Config(
        servers=servers,
        directions=directions,
        rates=[parse_step_rate(r) for r in _csv(pick("rates", DEFAULT_RATES))],
        step_seconds=float(pick("step_seconds", 3.0)),
        warmup_seconds=float(pick("warmup_seconds", 1.0)),
        warmup_rate=a.warmup_rate,
        drain_ms=int(pick("drain_ms", 500)),
        settle_seconds=float(pick("settle_seconds", 0.5)),
        allocs=int(pick("allocs", 200)),
        client_hosts=hosts,
        payload=a.payload,
        burst=a.burst,
        inflight=a.inflight,
        loss_timeout_ms=a.loss_timeout_ms,
        repeats=int(pick("repeats", 3)),
        workers=a.workers,
        ours_cmd=a.ours_cmd,
        coturn_bin=a.coturn_bin,
        host=a.host,
        peer_host=a.peer_host,
        relay_ports=(int(low), int(high)),
        retry_busy=int(pick("retry_busy", 1)),
        calibrate=not a.no_calibrate and not a.quick,
        wait_quiet=a.wait_quiet,
        quiet_load=a.quiet_load,
        quick=a.quick,
        json_path=a.json_path,
    )
    checks = [
        (0 < cfg.step_seconds <= 30 and 0 <= cfg.warmup_seconds <= 30, "step/warmup seconds"),
        (1 <= cfg.allocs <= 5000, "--allocs in [1, 5000]"),
        (24 <= cfg.payload <= 1200, "--payload in [24, 1200]"),
        (1 <= cfg.burst <= 64, "--burst in [1, 64]"),
        (1 <= cfg.inflight <= 1_000_000, "--inflight in [1, 1000000]"),
        (10 <= cfg.loss_timeout_ms <= 10_000, "--loss-timeout-ms in [10, 10000]"),
        (1 <= cfg.repeats <= 20, "--repeats in [1, 20]"),
        (0 <= cfg.retry_busy <= 5, "--retry-busy in [0, 5]"),
        (0 <= cfg.drain_ms <= 10_000, "--drain-ms in [0, 10000]"),
        (0 <= cfg.wait_quiet <= 1800, "--wait-quiet in [0, 1800]"),
        (bool(cfg.rates) and all(r <= 2_000_000 for r in cfg.rates), "--rates up to 2m"),
        (1 <= cfg.workers <= 64, "--workers in [1, 64]"),
    ]
    for ok, text in checks:
        if not ok:
            p.error(text)
    return cfg


# ---------------------------------------------------------------- servers


@dataclass
class Server:
    """A server under test, or the C stand-in relay."""

    name: str
    port: int
    proc: ManagedProcess

    @property
    def pid(self) -> int:
        return self.proc.pid


def coturn_command(cfg: Config, port: int, workdir: Path) -> list[str]:
    """turnserver with UDP and TCP listeners, long-term credentials, loopback peers."""
    low, high = cfg.relay_ports
    return [
        cfg.coturn_bin, "-n",
        f"--listening-ip={cfg.host}", f"--listening-port={port}", f"--relay-ip={cfg.host}",
        f"--min-port={low}", f"--max-port={high}", "--allow-loopback-peers",
        "--lt-cred-mech", f"--user={USER}:{PASSWORD}", f"--realm={REALM}",
        "--no-tls", "--no-dtls", "--no-cli", "--no-rfc5780",
        "--total-quota=0", "--user-quota=0", f"--relay-threads={cfg.workers}",
        f"--log-file={workdir / 'coturn.log'}", "--simple-log", "--no-stdout-log",
        f"--pidfile={workdir / 'coturn.pid'}", f"--userdb={workdir / 'coturn.sqlite'}",
    ]  # fmt: skip


def ours_command(cfg: Config, port: int) -> list[str]:
    """Expand the --ours-cmd template token by token."""
    low, high = cfg.relay_ports
    values = {
        "python": sys.executable,
        "host": cfg.host,
        "port": str(port),
        "workers": str(cfg.workers),
        "user": USER,
        "password": PASSWORD,
        "realm": REALM,
        "relay_ip": cfg.host,
        "relay_low": str(low),
        "relay_high": str(high),
    }
    return [tok.format(**values) for tok in shlex.split(cfg.ours_cmd)]


def tcp_binding_probe(host: str, port: int, timeout: float = 0.5) -> bool:
    """One Binding request over a fresh TCP connection; True if its success comes back."""
    txid = os.urandom(12)
    req = struct.pack("!HHI", 0x0001, 0, MAGIC_COOKIE) + txid
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(req)
            data = b""
            while len(data) < 20:
                chunk = s.recv(2048)
                if not chunk:
                    return False
                data += chunk
    except OSError:
        return False
    return data[:2] == b"\x01\x01" and data[8:20] == txid


def wait_for_tcp(host: str, port: int, proc: ManagedProcess, timeout: float = 15.0) -> None:
    """Poll with Binding requests over TCP until one is answered, or raise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"server exited rc={proc.proc.returncode}: {proc.log_tail()}")
        if tcp_binding_probe(host, port, 0.3):
            return
        time.sleep(0.05)
    raise RuntimeError(f"no Binding answer over TCP from {host}:{port} within {timeout:.0f}s")


def start_server(name: str, cfg: Config, workdir: Path, binary: Path) -> Server:
    """Start coturn, ours or the C stand-in ("c-relay") on a free port and wait for it."""
    port = free_port(cfg.host, udp=True, tcp=True)
    env = None
    if name == "coturn":
        for stale in ("coturn.log", "coturn.pid", "coturn.sqlite"):
            (workdir / stale).unlink(missing_ok=True)
        cmd = coturn_command(cfg, port, workdir)
    elif name == "ours":
        cmd, env = ours_command(cfg, port), ours_env(workdir)
    else:
        cmd = [str(binary), "fake", "--host", cfg.host, "--port", str(port),
               "--relay-ip", cfg.host, "--threads", str(cfg.workers),
               "--duration", "3600"]  # fmt: skip
    proc = ManagedProcess(cmd, workdir / f"{name}.out", env=env, cwd=REPO_ROOT)
    try:
        if name != "c-relay":
            wait_for_stun(cfg.host, port, proc)
            wait_for_group(cfg.host, port, cfg.workers, proc)
        wait_for_tcp(cfg.host, port, proc)
    except BaseException:
        proc.stop()
        raise
    return Server(name, port, proc)


# ---------------------------------------------------------------- generator


def session_cmd(binary: Path, cfg: Config, port: int) -> list[str]:
    return [
        str(binary), "session", "--host", cfg.host, "--port", str(port),
        "--client-hosts", ",".join(cfg.client_hosts), "--peer-host", cfg.peer_host,
        "--user", USER, "--password", PASSWORD, "--payload", str(cfg.payload),
        "--burst", str(cfg.burst), "--inflight", str(cfg.inflight),
        "--loss-timeout-ms", str(cfg.loss_timeout_ms), "--op-timeout", "60",
    ]  # fmt: skip


# ---------------------------------------------------------------- measuring


@dataclass
class Step:
    """One measured step: one server, one repeat, one direction, one offered rate."""

    server: str
    repeat: int
    direction: str
    offered: int
    achieved_send_pps: float
    delivered_pps: float
    loss_pct: float
    sent: int
    valid: int
    expired: int
    invalid: int
    write_blocked: int
    window_waits: int
    server_cpu_s: float
    server_cpu_pct: float
    cpu_us_per_msg: float | None
    user_share_pct: float
    loadgen_cpu_pct: float
    machine_busy_pct: float
    background_cpu_pct: float
    relay_drops: int
    lat_p50_us: int
    lat_p99_us: int
    per_alloc_min: int
    per_alloc_max: int
    silent_allocs: int
    dead_connections: int
    not_reached: bool
    server_tasks: int
    task_split: list[float] = field(default_factory=list)
    """CPU of the server's busiest threads/processes over the step, % of one core."""
    attempts: int = 1


@dataclass
class Run:
    """One server started once (one repeat): setup and its steps."""

    name: str
    repeat: int
    command: list[str] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class Snapshot:
    procs: dict[int, ProcStat]
    tasks: dict[int, int]
    system: SystemCpu
    drops: int


def task_ticks(root: int, procs: dict[int, ProcStat]) -> dict[int, int]:
    """utime+stime (ticks) of every thread of every process in root's tree."""
    out: dict[int, int] = {}
    for st in process_tree(root, procs):
        try:
            tids = os.listdir(f"/proc/{st.pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                raw = Path(f"/proc/{st.pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            fields = raw[raw.rindex(")") + 2 :].split()
            out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


def snapshot(cfg: Config, root: int) -> Snapshot:
    low, high = cfg.relay_ports
    drops = udp_drops_where(set(range(low, high + 1)), {cfg.host})
    procs = all_proc_stats()
    return Snapshot(procs, task_ticks(root, procs), system_cpu(), drops)


def split(a: Snapshot, b: Snapshot, wall: float, top: int = 3) -> list[float]:
    """The busiest server threads over a step, in % of one core (how the work spread)."""
    used = sorted((t - a.tasks.get(tid, 0) for tid, t in b.tasks.items()), reverse=True)
    return [round(u / CLK_TCK / wall * 100, 1) for u in used[:top]]


def _user_seconds(pid: int, procs: dict[int, ProcStat]) -> float:
    return sum(st.utime + st.cutime for st in process_tree(pid, procs)) / CLK_TCK


def measure(
    server: Server, gen: GenSession, cfg: Config, direction: str, rate: int, seconds: float,
    repeat: int,
) -> Step:  # fmt: skip
    """One relay step with the server's CPU and everybody else's around it."""
    a = snapshot(cfg, server.pid)
    out = gen.call(
        f"relay {direction} {rate} {seconds:g} {cfg.drain_ms}",
        timeout=seconds + cfg.drain_ms / 1000 + 30,
    )
    b = snapshot(cfg, server.pid)
    wall = max(1e-6, float(out["wall_s"]))
    pid = server.pid
    cpu = tree_cpu_seconds(pid, b.procs) - tree_cpu_seconds(pid, a.procs)
    user = _user_seconds(pid, b.procs) - _user_seconds(pid, a.procs)
    tree = {st.pid for st in process_tree(pid, b.procs)} | {
        st.pid for st in process_tree(pid, a.procs)
    }
    other = other_cpu_seconds(a.procs, b.procs, tree | {os.getpid(), gen.proc.pid})
    valid = int(out["valid"])
    achieved = float(out["achieved_send_pps"])
    return Step(
        server=server.name,
        repeat=repeat,
        direction=direction,
        offered=rate,
        achieved_send_pps=achieved,
        delivered_pps=float(out["delivered_pps"]),
        loss_pct=float(out["loss_pct"]),
        sent=int(out["sent"]),
        valid=valid,
        expired=int(out["expired"]),
        invalid=sum(int(out[k]) for k in ("bad", "misrouted", "duplicates", "stray")),
        write_blocked=int(out["write_blocked"]),
        window_waits=int(out["window_waits"]),
        server_cpu_s=cpu,
        server_cpu_pct=cpu / wall * 100,
        cpu_us_per_msg=cpu / valid * 1e6 if valid else None,
        user_share_pct=user / cpu * 100 if cpu > 0 else 0.0,
        loadgen_cpu_pct=float(out["cpu"]["pct_of_one_core"]),
        machine_busy_pct=busy_pct(a.system, b.system),
        background_cpu_pct=other / wall * 100,
        relay_drops=b.drops - a.drops,
        lat_p50_us=int(out["latency_us"]["p50"]),
        lat_p99_us=int(out["latency_us"]["p99"]),
        per_alloc_min=int(out["per_allocation"]["min"]),
        per_alloc_max=int(out["per_allocation"]["max"]),
        silent_allocs=int(out["per_allocation"]["silent"]),
        dead_connections=int(out["dead_connections"]),
        not_reached=rate > 0 and achieved < GEN_OK_FRACTION * rate,
        server_tasks=sum(thread_count(p) for p in tree),
        task_split=split(a, b, wall),
    )


def measure_quiet(
    server: Server, gen: GenSession, cfg: Config, direction: str, rate: int, repeat: int,
    out: TextIO,
) -> Step:  # fmt: skip
    """measure(), re-run (up to --retry-busy times) while other processes were busy; keeps
    the attempt with the least background CPU."""
    best = measure(server, gen, cfg, direction, rate, cfg.step_seconds, repeat)
    for attempt in range(2, cfg.retry_busy + 2):
        if best.background_cpu_pct <= BACKGROUND_LIMIT_PCT:
            break
        print(f"[{server.name}] busy background, retrying: {fmt_step(best)}", file=out)
        time.sleep(cfg.settle_seconds)
        step = replace(
            measure(server, gen, cfg, direction, rate, cfg.step_seconds, repeat),
            attempts=attempt,
        )
        best = min(best, step, key=lambda s: s.background_cpu_pct)
    return best


def server_run(
    name: str, repeat: int, cfg: Config, binary: Path, workdir: Path, out: TextIO
) -> Run:
    """Fresh server; allocations and channels over TCP; warm-up; every direction and rate."""
    run = Run(name=name, repeat=repeat)
    try:
        server = start_server(name, cfg, workdir, binary)
    except (RuntimeError, OSError) as exc:
        run.error = f"start failed: {exc}"
        print(f"[{name}] {run.error}", file=out)
        return run
    run.command = server.proc.cmd
    print(f"[{name} #{repeat}] pid {server.pid} on {cfg.host}:{server.port}: "
          f"{shlex.join(run.command)}", file=out)  # fmt: skip
    gen = GenSession(session_cmd(binary, cfg, server.port), workdir / f"gen-{name}.err", None)
    try:
        alloc = gen.call(f"alloc {cfg.allocs}", timeout=90)
        bind = gen.call("bind", timeout=90)
        run.setup = {"alloc": alloc, "bind": bind}
        print(f"[{name} #{repeat}] {alloc['ok']}/{cfg.allocs} allocations over TCP in "
              f"{alloc['seconds']:.2f}s, {bind['ok']} channels in {bind['seconds']:.2f}s",
              file=out)  # fmt: skip
        if alloc["ok"] < cfg.allocs or bind["ok"] < cfg.allocs:
            raise RuntimeError(f"setup incomplete: {alloc} {bind}")
        for direction in cfg.directions:
            if cfg.warmup_seconds > 0:
                warm = measure(server, gen, cfg, direction, cfg.warmup_rate,
                               cfg.warmup_seconds, repeat)  # fmt: skip
                print(f"[{name} #{repeat}] warmup: {fmt_step(warm)}", file=out)
            for rate in cfg.rates:
                time.sleep(cfg.settle_seconds)
                if not server.proc.alive():
                    raise RuntimeError(f"server died: {server.proc.log_tail(500)}")
                step = measure_quiet(server, gen, cfg, direction, rate, repeat, out)
                run.steps.append(step)
                print(fmt_step(step), file=out, flush=True)
        gen.call("release", timeout=30)
    except (RuntimeError, OSError, ValueError) as exc:
        run.error = str(exc)
        print(f"[{name} #{repeat}] ERROR {exc}", file=out)
    finally:
        gen.close()
        rc = server.proc.stop()
        print(f"[{name} #{repeat}] stopped (rc={rc})", file=out)
    return run


# ---------------------------------------------------------------- summary


@dataclass
class Cell:
    """Median over the repeats of one server, direction and rate."""

    server: str
    direction: str
    offered: int
    repeats: int
    """Steps the medians are taken over: the quiet ones, or all if none was quiet."""
    delivered_pps: float
    delivered_min: float
    delivered_max: float
    cpu_us_per_msg: float | None
    cpu_min: float | None
    cpu_max: float | None
    loss_pct: float
    user_share_pct: float
    server_cpu_pct: float
    loadgen_cpu_pct: float
    lat_p50_us: float
    lat_p99_us: float
    busy_steps: int
    all_busy: bool
    not_reached: int


def summarize(runs: list[Run], cfg: Config, names: Sequence[str]) -> list[Cell]:
    cells = []
    for name in names:
        for d in cfg.directions:
            for rate in cfg.rates:
                steps = [
                    s for r in runs if r.name == name for s in r.steps
                    if s.direction == d and s.offered == rate
                ]  # fmt: skip
                if not steps:
                    continue
                busy = sum(s.background_cpu_pct > BACKGROUND_LIMIT_PCT for s in steps)
                # Other work on a shared machine only ever makes a server look worse: take
                # the medians over the quiet repeats when there are any.
                quiet = [s for s in steps if s.background_cpu_pct <= BACKGROUND_LIMIT_PCT]
                steps = quiet or steps
                cpus = [s.cpu_us_per_msg for s in steps if s.cpu_us_per_msg is not None]
                dl = [s.delivered_pps for s in steps]
                cells.append(
                    Cell(
                        server=name,
                        direction=d,
                        offered=rate,
                        repeats=len(steps),
                        delivered_pps=statistics.median(dl),
                        delivered_min=min(dl),
                        delivered_max=max(dl),
                        cpu_us_per_msg=statistics.median(cpus) if cpus else None,
                        cpu_min=min(cpus) if cpus else None,
                        cpu_max=max(cpus) if cpus else None,
                        loss_pct=statistics.median(s.loss_pct for s in steps),
                        user_share_pct=statistics.median(s.user_share_pct for s in steps),
                        server_cpu_pct=statistics.median(s.server_cpu_pct for s in steps),
                        loadgen_cpu_pct=statistics.median(s.loadgen_cpu_pct for s in steps),
                        lat_p50_us=statistics.median(s.lat_p50_us for s in steps),
                        lat_p99_us=statistics.median(s.lat_p99_us for s in steps),
                        busy_steps=busy,
                        all_busy=not quiet,
                        not_reached=sum(s.not_reached for s in steps),
                    )
                )
    return cells


def _cell(cells: list[Cell], server: str, d: str, rate: int) -> Cell | None:
    for c in cells:
        if (c.server, c.direction, c.offered) == (server, d, rate):
            return c
    return None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def ratios(cells: list[Cell], cfg: Config) -> dict[str, dict[str, Any]]:
    """ours/coturn per direction and rate: delivered msgs/s and CPU per message."""
    out: dict[str, dict[str, Any]] = {}
    for d in cfg.directions:
        for rate in cfg.rates:
            o, c = _cell(cells, "ours", d, rate), _cell(cells, "coturn", d, rate)
            if o is None or c is None:
                continue
            out[f"{d}@{fmt_rate(rate)}"] = {
                "delivered": _ratio(o.delivered_pps, c.delivered_pps),
                "cpu_per_msg": _ratio(o.cpu_us_per_msg, c.cpu_us_per_msg),
            }
    return out


# ---------------------------------------------------------------- output

STEP_HEADER = (
    f"{'server':<8} {'rep':>3} {'dir':<3} {'offered':>8} {'sent/s':>9} {'deliv/s':>9} "
    f"{'loss%':>6} {'srvCPU%':>7} {'us/msg':>6} {'user%':>5} {'genCPU%':>7} {'box%':>4} "
    f"{'p50us':>7} {'p99us':>8} {'bgCPU%':>6} {'top-thr%':>11} flags"
)


def fmt_step(s: Step) -> str:
    per = f"{s.cpu_us_per_msg:6.2f}" if s.cpu_us_per_msg is not None else f"{'-':>6}"
    flags = ",".join(
        f for f, on in (
            ("NOT-REACHED", s.not_reached),
            ("BUSY-BACKGROUND", s.background_cpu_pct > BACKGROUND_LIMIT_PCT),
            (f"relay-drops={s.relay_drops}", s.relay_drops > 0),
            (f"invalid={s.invalid}", s.invalid > 0),
            (f"silent-allocs={s.silent_allocs}", s.silent_allocs > 0),
            (f"dead-conns={s.dead_connections}", s.dead_connections > 0),
            (f"try={s.attempts}", s.attempts > 1),
        ) if on
    )  # fmt: skip
    spread = "/".join(f"{x:.0f}" for x in s.task_split)
    return (
        f"{s.server:<8} {s.repeat:>3} {s.direction:<3} {fmt_rate(s.offered):>8} "
        f"{s.achieved_send_pps:>9,.0f} {s.delivered_pps:>9,.0f} {s.loss_pct:>6.2f} "
        f"{s.server_cpu_pct:>7.1f} {per} {s.user_share_pct:>5.0f} {s.loadgen_cpu_pct:>7.1f} "
        f"{s.machine_busy_pct:>4.0f} {s.lat_p50_us:>7,} {s.lat_p99_us:>8,} "
        f"{s.background_cpu_pct:>6.1f} {spread:>11} {flags}"
    )


def _f(v: float | None, spec: str) -> str:
    return format(v, spec) if v is not None else "-"


def median_table(cells: list[Cell], cfg: Config, out: TextIO) -> None:
    print(f"\nmedians over {cfg.repeats} repeat(s), busy steps left out when quiet ones "
          "exist (min-max in brackets):", file=out)  # fmt: skip
    print(f"{'server':<8} {'dir':<3} {'offered':>8} {'delivered/s':>28} {'loss%':>6} "
          f"{'CPU us/msg':>22} {'user%':>5} {'srvCPU%':>7} {'p50us':>7} {'p99us':>8}",
          file=out)  # fmt: skip
    for c in cells:
        dl = f"{c.delivered_pps:,.0f} [{c.delivered_min:,.0f}-{c.delivered_max:,.0f}]"
        cpu = f"{_f(c.cpu_us_per_msg, '.2f')} [{_f(c.cpu_min, '.2f')}-{_f(c.cpu_max, '.2f')}]"
        busy = "ALL BUSY" if c.all_busy else f"n={c.repeats}, {c.busy_steps} busy left out"
        flags = (f" {busy}" if c.busy_steps else "") + (
            f" not-reached={c.not_reached}" if c.not_reached else ""
        )
        print(f"{c.server:<8} {c.direction:<3} {fmt_rate(c.offered):>8} {dl:>28} "
              f"{c.loss_pct:>6.2f} {cpu:>22} {c.user_share_pct:>5.0f} {c.server_cpu_pct:>7.1f} "
              f"{c.lat_p50_us:>7,.0f} {c.lat_p99_us:>8,.0f}{flags}", file=out)  # fmt: skip


def markdown_table(cells: list[Cell], cfg: Config) -> str:
    """The comparison as a Markdown table (for docs/performance.md)."""
    lines = [
        "| direction | offered msgs/s | coturn msgs/s | coturn CPU us/msg | ours msgs/s "
        "| ours CPU us/msg | msgs/s ours/coturn | CPU/msg ours/coturn |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for d in cfg.directions:
        for rate in cfg.rates:
            c, o = _cell(cells, "coturn", d, rate), _cell(cells, "ours", d, rate)
            if c is None or o is None:
                continue
            r_d = _ratio(o.delivered_pps, c.delivered_pps)
            r_c = _ratio(o.cpu_us_per_msg, c.cpu_us_per_msg)
            lines.append(
                f"| {d} | {fmt_rate(rate) if rate else 'max (window)'} | "
                f"{c.delivered_pps:,.0f} | {_f(c.cpu_us_per_msg, '.2f')} | "
                f"{o.delivered_pps:,.0f} | {_f(o.cpu_us_per_msg, '.2f')} | "
                f"{_f(r_d, '.2f')}x | {_f(r_c, '.2f')}x |"
            )
    return "\n".join(lines)


def method_text(cfg: Config) -> str:
    low, high = cfg.relay_ports
    seg = 4 + ((cfg.payload + 3) & ~3)
    lines = [
        f"servers on {cfg.host} (UDP and TCP listeners; relay address {cfg.host}, relay ports "
        f"{low}-{high}); ours --workers {cfg.workers}, coturn --relay-threads {cfg.workers}; "
        "long-term credentials (HMAC-SHA1 MESSAGE-INTEGRITY).",
        f"{cfg.allocs} TCP connections from {len(cfg.client_hosts)} source IPs "
        f"({cfg.client_hosts[0]}..{cfg.client_hosts[-1]}, round-robin), one UDP allocation and "
        f"one channel each, to its own UDP peer socket on {cfg.peer_host}.",
        f"payload {cfg.payload} bytes; c2p frames {seg} bytes on the stream (ChannelData padded "
        f"to 4), written {cfg.burst} frames per write() per connection visit (TCP_NODELAY); "
        f"p2c peers send UDP GSO groups of {cfg.burst} datagrams per visit.",
        f"at most {cfg.inflight:,} messages in flight (sent, not yet delivered; p2c only: not "
        f"older than {cfg.loss_timeout_ms} ms, as UDP into the relay may drop); 'max' = offered "
        "as fast as that window allows (saturation).",
        f"each step {cfg.step_seconds:g} s + up to {cfg.drain_ms} ms drain, "
        f"{cfg.settle_seconds:g} s pause; warmup {cfg.warmup_seconds:g} s at "
        f"{cfg.warmup_rate:,}/s per direction; {cfg.repeats} repeat(s) per server on fresh "
        "servers, servers alternating (order reversed every other repeat).",
        "deliv/s = messages delivered during the send phase / its duration (right socket, "
        "run nonce, allocation, channel, once); loss = 1 - delivered/sent.",
        "srvCPU% = utime+stime of the server process tree (/proc, all threads) over the step "
        "incl. drain (100 = one core); us/msg = that CPU per delivered message; user% = its "
        "user-mode share; loopback softirq work is charged to no process; top-thr% = CPU of "
        "the server's three busiest threads (how the work spread over the CPUs).",
        "genCPU% = the generator's own CPU (one thread, sharing the CPUs with the server); "
        "box% = whole machine busy; bgCPU% = every other process (BUSY-BACKGROUND > 5%).",
    ]
    return "method:\n  " + "\n  ".join(lines)


# ---------------------------------------------------------------- main


def machine_load(label: str, out: TextIO) -> dict[str, Any]:
    la = load_average()
    bg = background_cpu_pct(1.0)
    print(f"machine load {label}: loadavg {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; other processes "
          f"used {bg:.0f}% of one core over 1 s", file=out)  # fmt: skip
    return {"loadavg": list(la), "background_cpu_pct": bg}


def wait_for_quiet(cfg: Config, out: TextIO) -> float:
    """Wait (bounded by --wait-quiet) for the 1-minute load average to drop; returns it."""
    deadline = time.monotonic() + cfg.wait_quiet
    load = load_average()[0]
    while load >= cfg.quiet_load and time.monotonic() < deadline:
        print(f"load average {load:.2f} >= {cfg.quiet_load:g}, waiting", file=out, flush=True)
        time.sleep(min(15.0, max(0.0, deadline - time.monotonic())))
        load = load_average()[0]
    return load


def run_all(cfg: Config, binary: Path, out: TextIO) -> tuple[list[Run], list[Run]]:
    runs: list[Run] = []
    calib: list[Run] = []
    with temp_workdir("stunturn-bench-turn-tcp-") as workdir:
        if cfg.calibrate:
            print(f"generator check against a trivial C relay ({cfg.workers} threads):", file=out)
            calib.append(server_run("c-relay", 1, cfg, binary, workdir, out))
        print(STEP_HEADER, file=out)
        for rep in range(1, cfg.repeats + 1):
            order = cfg.servers if rep % 2 else list(reversed(cfg.servers))
            for name in order:
                runs.append(server_run(name, rep, cfg, binary, workdir, out))
    return runs, calib


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    cfg = parse_args(argv)
    out = sys.stderr if cfg.json_path == "-" else sys.stdout
    if "coturn" in cfg.servers and shutil.which(cfg.coturn_bin) is None:
        print(f"coturn binary {cfg.coturn_bin!r} not found", file=sys.stderr)
        return 2
    raise_nofile_limit()
    started = time.monotonic()
    binary = compile_c(BENCH_DIR / "turn_tcp_loadgen.c", libs=("-lcrypto",))
    machine = machine_info()
    print(
        f"machine: {machine['cpu_model']}, {machine['logical_cpus']} CPUs "
        f"({machine['usable_cpus']} usable), kernel {machine['kernel']}, "
        f"Python {machine['python']}; workers/threads per server: {cfg.workers}",
        file=out,
    )
    print(method_text(cfg), file=out)
    if cfg.wait_quiet > 0:
        wait_for_quiet(cfg, out)
    load_before = machine_load("before", out)
    runs, calib = run_all(cfg, binary, out)
    load_after = machine_load("after", out)
    cells = summarize(runs, cfg, cfg.servers)
    median_table(cells, cfg, out)
    calib_cells = summarize(calib, cfg, ["c-relay"])
    if calib_cells:
        print(f"\ngenerator check (trivial C relay, {cfg.workers} threads, one run):", file=out)
        for c in calib_cells:
            best = max(
                (x.delivered_pps for x in cells
                 if x.direction == c.direction and x.offered == c.offered),
                default=0.0,
            )  # fmt: skip
            print(f"  {c.direction} {fmt_rate(c.offered)}: {c.delivered_pps:,.0f}/s "
                  f"(generator {c.loadgen_cpu_pct:.0f}% of a core)"
                  + (f" = {c.delivered_pps / best:.1f}x the best server" if best else ""),
                  file=out)  # fmt: skip
    r = ratios(cells, cfg)
    if r:
        print("\nours/coturn (medians):", file=out)
        for key, v in r.items():
            print(f"  {key}: delivered {_f(v['delivered'], '.2f')}x, CPU/msg "
                  f"{_f(v['cpu_per_msg'], '.2f')}x", file=out)  # fmt: skip
        print("\n" + markdown_table(cells, cfg), file=out)
    steps = [s for run in runs for s in run.steps]
    busy = sum(s.background_cpu_pct > BACKGROUND_LIMIT_PCT for s in steps)
    if busy:
        print(f"WARNING: {busy} of {len(steps)} steps ran with other processes busy "
              "(> 5% of a core): take final numbers on a quiet machine", file=out)  # fmt: skip
    print(f"total time {time.monotonic() - started:.0f} s", file=out)
    if cfg.json_path:
        doc = {
            "machine": machine,
            "load": {"before": load_before, "after": load_after, "busy_steps": busy},
            "method": method_text(cfg),
            "config": asdict(cfg),
            "runs": [asdict(x) for x in runs],
            "generator_check": [asdict(x) for x in calib],
            "medians": [asdict(c) for c in cells],
            "ratios_ours_over_coturn": r,
        }
        text = json.dumps(doc, indent=2)
        if cfg.json_path == "-":
            print(text)
        else:
            Path(cfg.json_path).write_text(text + "\n")
    return 0 if not any(x.error for x in [*runs, *calib]) else 1


if __name__ == "__main__":
    sys.exit(main())
