"""Shared helpers for stunturn benchmarks.

Process start/stop, free loopback ports, CPU accounting from /proc, compiling the
C load generator into a build directory, a tiny STUN Binding probe, machine info.
Linux only (reads /proc).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import resource
import select
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")
MAGIC_COOKIE = 0x2112A442


# ---------------------------------------------------------------- building


def build_dir() -> Path:
    """Directory for build products ($STUNTURN_BENCH_BUILD or a temp dir); never in git."""
    env = os.environ.get("STUNTURN_BENCH_BUILD")
    path = Path(env) if env else Path(tempfile.gettempdir()) / "stunturn-bench-build"
    path.mkdir(parents=True, exist_ok=True)
    return path


def compile_c(
    source: Path,
    out_dir: Path | None = None,
    cc: str = "gcc",
    flags: Sequence[str] = CFLAGS,
    libs: Sequence[str] = (),
) -> Path:
    """Compile one C file; cached by a hash of source and flags. Returns the binary path."""
    key = hashlib.sha256(source.read_bytes() + " ".join([cc, *flags, *libs]).encode())
    binary = (out_dir or build_dir()) / f"{source.stem}-{key.hexdigest()[:12]}"
    if binary.exists():
        return binary
    tmp = binary.with_name(binary.name + f".tmp{os.getpid()}")
    cmd = [cc, *flags, "-o", str(tmp), str(source), *libs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0 or proc.stderr.strip():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compile failed or warned: {' '.join(cmd)}\n{proc.stderr}")
    tmp.replace(binary)
    return binary


# ---------------------------------------------------------------- ports


def free_port(host: str = "127.0.0.1", udp: bool = True, tcp: bool = False) -> int:
    """A port free for UDP (and TCP if asked) on host, chosen by the kernel. Racy by nature."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if _port_bindable(family, host, port, udp, tcp):
            return port
    raise RuntimeError("no free port found")


def _port_bindable(family: int, host: str, port: int, udp: bool, tcp: bool) -> bool:
    kinds = ([socket.SOCK_DGRAM] if udp else []) + ([socket.SOCK_STREAM] if tcp else [])
    try:
        for kind in kinds:
            with socket.socket(family, kind) as s:
                s.bind((host, port))
    except OSError:
        return False
    return True


def balanced_source_ports(
    host: str, server_port: int, group_size: int, count: int, max_probes: int = 4000
) -> list[int]:
    """Source ports that a SO_REUSEPORT group of group_size sockets on server_port splits evenly.

    Linux picks the socket by a hash of the 4-tuple modulo the group size (fixed per
    boot), so we bind a stand-in group on the (still free) server port, send one byte
    from candidate ports in 20000-31999 (below the ephemeral range) and keep ports
    until each group member has its quota. Loopback only; one datagram per candidate.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    quotas = [count // group_size + (1 if i < count % group_size else 0) for i in range(group_size)]
    group = [_reuseport_socket(family, host, server_port) for _ in range(group_size)]
    candidates = random.sample(range(20000, 32000), k=min(max_probes, 12000))
    chosen: list[int] = []
    try:
        for port in candidates:
            idx = _probe_member(group, family, host, server_port, port)
            if idx is not None and quotas[idx] > 0:
                quotas[idx] -= 1
                chosen.append(port)
            if len(chosen) == count:
                return chosen
    finally:
        for sock in group:
            sock.close()
    raise RuntimeError(f"found only {len(chosen)} of {count} balanced source ports")


def _reuseport_socket(family: int, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _probe_member(
    group: list[socket.socket], family: int, host: str, server_port: int, port: int
) -> int | None:
    """Index of the group member that receives a datagram from host:port, or None."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, port))
            probe.sendto(b"?", (host, server_port))
        except OSError:
            return None
        ready, _, _ = select.select(group, [], [], 0.2)
        for sock in ready:
            _, src = sock.recvfrom(64)
            if src[1] == port:
                return group.index(sock)
    return None


# ---------------------------------------------------------------- processes


class ManagedProcess:
    """A child process in its own session, logged to a file, stopped by its own id."""

    def __init__(
        self,
        cmd: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        self.cmd = pinned(cmd, cpus)
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        """Process id (also the process-group id)."""
        return self.proc.pid

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL the process group we created; returns the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers of our own group only
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        self._log.close()
        return self.proc.returncode

    def log_tail(self, max_bytes: int = 2000) -> str:
        """Last bytes of the log file."""
        data = self.log_path.read_bytes() if self.log_path.exists() else b""
        return data[-max_bytes:].decode(errors="replace")

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def pinned(cmd: Sequence[str], cpus: set[int] | None) -> list[str]:
    """Prefix cmd with `taskset -c LIST` when cpus is given."""
    if not cpus:
        return list(cmd)
    return ["taskset", "-c", ",".join(str(c) for c in sorted(cpus)), *cmd]


def run_json(cmd: Sequence[str], timeout: float, cpus: set[int] | None = None) -> dict[str, Any]:
    """Run a command that prints one JSON line on stdout; return it parsed."""
    proc = subprocess.run(
        pinned(cmd, cpus), capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{cmd[0]} failed rc={proc.returncode}: {proc.stderr.strip()}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# ---------------------------------------------------------------- CPU accounting


@dataclass(frozen=True)
class ProcStat:
    """Fields of /proc/PID/stat that we use (times in clock ticks)."""

    pid: int
    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int


CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_proc_stat(pid: int) -> ProcStat | None:
    """Parse /proc/PID/stat; None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is state (field 3); utime is field 14 -> index 11
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        utime=int(fields[11]),
        stime=int(fields[12]),
        cutime=int(fields[13]),
        cstime=int(fields[14]),
    )


def all_proc_stats() -> dict[int, ProcStat]:
    """Stat of every visible process."""
    out: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_proc_stat(int(entry))
            if st is not None:
                out[st.pid] = st
    return out


def process_tree(root: int, stats: Mapping[int, ProcStat]) -> list[ProcStat]:
    """root and all its living descendants."""
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    out: list[ProcStat] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out.append(stats[pid])
            todo.extend(children.get(pid, []))
    return out


def _ticks(st: ProcStat) -> int:
    return st.utime + st.stime + st.cutime + st.cstime


def tree_cpu_seconds(root: int, stats: Mapping[int, ProcStat] | None = None) -> float:
    """CPU seconds (user+sys) of a process tree, all threads, incl. reaped children.

    /proc/PID/stat utime/stime already sum every thread of the process (live and
    exited); cutime/cstime add children that were waited for. Summing these over
    the living tree counts each CPU second once.
    """
    tree = process_tree(root, stats if stats is not None else all_proc_stats())
    return sum(_ticks(st) for st in tree) / CLK_TCK


def other_cpu_seconds(
    before: Mapping[int, ProcStat], after: Mapping[int, ProcStat], exclude: set[int]
) -> float:
    """CPU seconds used between two snapshots by every process except exclude.

    Background noise indicator: the difference of the totals (own + reaped
    children) over all other processes, so a child reaped in between moves into its
    parent's cutime without being counted twice.
    """
    total_after = sum(_ticks(st) for pid, st in after.items() if pid not in exclude)
    total_before = sum(_ticks(st) for pid, st in before.items() if pid not in exclude)
    return max(0, total_after - total_before) / CLK_TCK


def thread_count(pid: int) -> int:
    """Number of threads of pid (from /proc/PID/task)."""
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return 0


@dataclass(frozen=True)
class SystemCpu:
    """Whole-machine idle time (seconds, all CPUs summed) at a monotonic instant."""

    idle: float
    at: float


def system_cpu() -> SystemCpu:
    """Idle+iowait from the aggregate line of /proc/stat, stamped with time.monotonic()."""
    with open("/proc/stat") as fh:
        parts = fh.readline().split()
    return SystemCpu(idle=(int(parts[4]) + int(parts[5])) / CLK_TCK, at=time.monotonic())


def busy_pct(before: SystemCpu, after: SystemCpu) -> float:
    """Share of all CPUs not idle between two samples, in percent.

    Uses wall time minus idle: with tickless idle the idle counter is exact while the
    user/system counters are tick-sampled and miss short bursts.
    """
    span = (after.at - before.at) * (os.cpu_count() or 1)
    return max(0.0, 100.0 * (1.0 - (after.idle - before.idle) / span)) if span > 0 else 0.0


def udp_counters() -> dict[str, int]:
    """Machine-wide UDP counters from /proc/net/snmp (InDatagrams, RcvbufErrors, ...)."""
    rows = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()]
    udp = [r for r in rows if r and r[0] == "Udp:"]
    return dict(zip(udp[0][1:], (int(v) for v in udp[1][1:]), strict=True))


def udp_port_drops(port: int) -> int:
    """Receive-queue drops summed over every UDP socket bound to local port (udp + udp6)."""
    total = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port:
                    total += int(cols[-1])
    return total


def udp_drops_where(ports: set[int], ips: set[str] | None = None) -> int:
    """Receive-queue drops summed over IPv4 UDP sockets whose local port is in ports.

    ips (dotted quads) narrows the match to sockets bound to those addresses.
    """
    want = {socket.inet_aton(ip)[::-1].hex().upper() for ip in ips} if ips else None
    total = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            cols = line.split()
            ip_hex, port_hex = cols[1].split(":")
            if int(port_hex, 16) in ports and (want is None or ip_hex in want):
                total += int(cols[-1])
    return total


def udp_sockets_on(port: int, ip: str) -> int:
    """How many IPv4 UDP sockets are bound to ip:port (e.g. a SO_REUSEPORT group)."""
    want = f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return 0
    return sum(1 for line in lines if line.split()[1] == want)


# ---------------------------------------------------------------- memory and limits


@dataclass(frozen=True)
class TreeMemory:
    """Resident memory of a process tree, summed over its processes (kB)."""

    rss_kb: int
    pss_kb: int
    uss_kb: int
    processes: int


def _status_kb(pid: int, field_name: str, filename: str) -> int:
    try:
        text = Path(f"/proc/{pid}/{filename}").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    for line in text.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def tree_memory(root: int) -> TreeMemory:
    """RSS (VmRSS) and PSS (smaps_rollup) of root and its living descendants.

    RSS counts pages shared between processes (e.g. forked workers) once per process;
    PSS splits them among every process mapping them (so it moves when unrelated processes
    map the same files); USS (Private_Clean + Private_Dirty) counts only unshared pages.
    """
    tree = process_tree(root, all_proc_stats())
    rss = sum(_status_kb(st.pid, "VmRSS", "status") for st in tree)
    pss = sum(_status_kb(st.pid, "Pss", "smaps_rollup") for st in tree)
    uss = sum(
        _status_kb(st.pid, "Private_Clean", "smaps_rollup")
        + _status_kb(st.pid, "Private_Dirty", "smaps_rollup")
        for st in tree
    )
    return TreeMemory(rss_kb=rss, pss_kb=pss, uss_kb=uss, processes=len(tree))


def raise_nofile_limit(want: int | None = None) -> tuple[int, int]:
    """Raise our soft open-files limit (inherited by children) to want or the hard limit.

    Returns the (soft, hard) limits now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if want is not None:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


# ---------------------------------------------------------------- machine load


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages from /proc/loadavg."""
    parts = Path("/proc/loadavg").read_text().split()
    return float(parts[0]), float(parts[1]), float(parts[2])


def background_cpu_pct(seconds: float = 1.0, exclude: set[int] | None = None) -> float:
    """CPU used by all processes but exclude (and us) over seconds, in % of one core."""
    before = all_proc_stats()
    time.sleep(seconds)
    after = all_proc_stats()
    skip = (exclude or set()) | {os.getpid()}
    return other_cpu_seconds(before, after, skip) / seconds * 100


# ---------------------------------------------------------------- STUN probe


def binding_probe(host: str, port: int, timeout: float = 0.5) -> bool:
    """Send one Binding request; True if a matching Binding success comes back."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    txid = os.urandom(12)
    req = struct.pack("!HHI", 0x0001, 0, MAGIC_COOKIE) + txid
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(req, (host, port))
            data = s.recv(2048)
        except OSError:
            return False
    return len(data) >= 20 and data[:2] == b"\x01\x01" and data[8:20] == txid


def wait_for_stun(
    host: str, port: int, proc: ManagedProcess | None = None, timeout: float = 15.0
) -> None:
    """Poll with Binding requests (about 5/s) until one is answered, or raise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"server exited rc={proc.proc.returncode}: {proc.log_tail()}")
        if binding_probe(host, port, timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"no Binding answer from {host}:{port} within {timeout:.0f}s")


# ---------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """CPU model, CPU counts, kernel, Python and gcc versions."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gcc": _first_line(["gcc", "--version"]),
    }


def _first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


@contextlib.contextmanager
def temp_workdir(prefix: str = "stunturn-bench-") -> Iterator[Path]:
    """A temporary directory for logs, pid files, databases."""
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        yield Path(d)
