"""Long-running fuzz target for the STUN codec, the stream framer and the sans-IO server core.

Run from the repository root::

    python tests/fuzz/fuzz_decode.py --seconds 60
    python tests/fuzz/fuzz_decode.py --seconds 600 --seed 7 --crash-dir /tmp/crashes
    python tests/fuzz/fuzz_decode.py --atheris -- -max_len=2048   # if atheris is installed

Each input goes through ``decode`` (Message or StunParseError; a decoded message re-encodes
to the same message), ``StreamFramer.feed`` (frames or FramingError) and
``ServerCore.handle_udp`` / ``handle_stream_frame`` (a list of well-formed responses, never an
exception). Inputs are random bytes and mutations of a corpus that grows with mutated inputs
that decode. Any other outcome is a crash: the first input of each distinct crash (exception
type and innermost frame) is printed with its traceback and, with ``--crash-dir``, saved; a
count per crash is printed at the end. Exit status 1 if anything crashed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import random
import struct
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stunturn.server import (  # noqa: E402
    AlternateAddresses,
    CoreConfig,
    SendTo,
    ServerCore,
    StreamAction,
    Transport,
)
from stunturn.stun import (  # noqa: E402
    ATTRIBUTE_CLASSES,
    Attribute,
    FramingError,
    Message,
    MessageClass,
    Method,
    StreamFramer,
    StunParseError,
    check_fingerprint,
    check_integrity,
    check_integrity_sha256,
    decode,
)

KEY = b"fuzz key"
TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
REGISTERED = sorted(ATTRIBUTE_CLASSES)
HEADER = struct.Struct("!HHI12s")
MAX_CORPUS = 20_000
GRID = AlternateAddresses("192.0.2.10", "192.0.2.11", 3478, 3479)
LOCALS = [*GRID.listeners(), ("2001:db8::1", 3478)]
REMOTES = [("198.51.100.7", 54321), ("2001:db8::7", 40000)]


# --- corpus ------------------------------------------------------------------------------------


def rfc_vectors() -> list[bytes]:
    """The RFC 5769 / RFC 8489 vectors from tests/vectors.py, if it is there."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        vectors = importlib.import_module("vectors")
    except ImportError:
        return []
    finally:
        sys.path.pop(0)
    return [value for name, value in vars(vectors).items() if name.isupper() and _is_stun(value)]


def _is_stun(value: object) -> bool:
    return isinstance(value, bytes) and len(value) >= 20 and value[4:8] == b"\x21\x12\xa4\x42"


def valid_values(rng: random.Random) -> list[Attribute]:
    """For every registered class, a few values found by trying random bytes until one decodes."""
    found: list[Attribute] = []
    for cls in ATTRIBUTE_CLASSES.values():
        hits = 0
        for _ in range(2000):
            size = rng.choice([0, 1, 4, 8, 12, 16, 20, 32, rng.randrange(40)])
            raw = bytearray(rng.randbytes(size))
            if size in (8, 20):
                raw[:2] = b"\x00\x01" if size == 8 else b"\x00\x02"
            try:
                found.append(cls.decode_value(bytes(raw), TID))
            except StunParseError:
                continue
            hits += 1
            if hits == 3:
                break
    return found


def seed_corpus(rng: random.Random) -> list[bytes]:
    corpus = rfc_vectors()
    values = valid_values(rng)
    for attr in values:
        corpus.append(Message(Method.BINDING, MessageClass.REQUEST, TID, [attr]).encode())
    for _ in range(200):
        attrs = rng.sample(values, rng.randint(0, min(6, len(values))))
        msg = Message(rng.randrange(0x1000), MessageClass(rng.randrange(4)), TID, attrs)
        try:
            corpus.append(
                msg.encode(
                    KEY if rng.random() < 0.5 else None,
                    sha256=rng.random() < 0.3,
                    fingerprint=rng.random() < 0.5,
                )
            )
        except ValueError:
            continue
    for cls in MessageClass:
        corpus.append(Message(Method.BINDING, cls, TID).encode(fingerprint=True))
    corpus.append(b"\x40\x00\x00\x05hello\x00\x00\x00")
    return corpus


# --- input generation --------------------------------------------------------------------------


def attribute_offsets(data: bytes | bytearray) -> list[int]:
    offsets = []
    pos = 20
    while pos + 4 <= len(data):
        offsets.append(pos)
        pos += 4 + ((int.from_bytes(data[pos + 2 : pos + 4], "big") + 3) & ~3)
    return offsets


def fix_length(data: bytearray) -> None:
    if len(data) >= 20:
        data[2:4] = ((len(data) - 20) & 0xFFFF).to_bytes(2, "big")


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    """Bit flips, truncations, length-field and attribute-length edits, type swaps, splices,
    duplicated attributes, and now and then a large attribute near the 64 KiB limit."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(10)
        offsets = attribute_offsets(out)
        if kind == 0 and out:
            for _ in range(rng.randint(1, 4)):
                out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:
            out[rng.randrange(len(out))] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif kind == 2:
            del out[rng.randrange(len(out) + 1) :]
        elif kind == 3 and len(out) >= 4:
            length = int.from_bytes(out[2:4], "big")
            new = rng.choice([0, length + 4, length - 4, length + 1, rng.randrange(0x10000)])
            out[2:4] = (new & 0xFFFF).to_bytes(2, "big")
        elif kind == 4 and offsets:
            off = rng.choice(offsets)
            alen = int.from_bytes(out[off + 2 : off + 4], "big")
            new = rng.choice([0, alen + 1, alen - 1, alen + 4, alen - 4, rng.randrange(0x10000)])
            out[off + 2 : off + 4] = (new & 0xFFFF).to_bytes(2, "big")
        elif kind == 5 and offsets:
            off = rng.choice(offsets)
            atype = rng.choice([*REGISTERED, rng.randrange(0x10000)])
            out[off : off + 2] = atype.to_bytes(2, "big")
        elif kind == 6:
            other = rng.choice(corpus)
            cut = rng.randrange(min(20, len(other)), len(other) + 1)
            out = out[: rng.randrange(len(out) + 1)] + other[cut:]
        elif kind == 7:
            pos = rng.randrange(len(out) + 1)
            if rng.random() < 0.5:
                out[pos:pos] = rng.randbytes(rng.choice([1, 2, 4, 8]))
            else:
                del out[pos : pos + rng.choice([1, 2, 4])]
        elif kind == 8 and offsets:
            off = rng.choice(offsets)
            end = off + 4 + ((int.from_bytes(out[off + 2 : off + 4], "big") + 3) & ~3)
            out[end:end] = out[off : min(end, len(out))]
        elif len(out) >= 2:
            out[0] = rng.randrange(0x40)
            out[1] = rng.randrange(256)
        if rng.random() < 0.005:
            # Now and then, grow toward the 64 KiB limit (PADDING, DATA or an unknown type).
            size = rng.choice([1000, 1500, rng.randrange(65400, 65532)])
            atype = rng.choice([0x0026, 0x0013, rng.randrange(0x10000)])
            room = max(0, 0xFFFF - (len(out) - 20) - 4) & ~3
            value = bytes(min(size, room))
            out += struct.pack("!HH", atype, len(value)) + value
            if len(out) >= 20 and rng.random() < 0.5:
                out[0:2] = b"\x00\x01"  # as a Binding request, so the server answers it
            fix_length(out)
            continue
        if rng.random() < 0.6:
            fix_length(out)
    return bytes(out)


def random_input(rng: random.Random) -> bytes:
    size = rng.choice([0, 4, 19, 20, 24, 28, rng.randrange(300)])
    data = bytearray(rng.randbytes(size))
    if size >= 20 and rng.random() < 0.5:
        data[0] &= 0x3F
        data[4:8] = b"\x21\x12\xa4\x42"
        fix_length(data)
    return bytes(data)


# --- the checks --------------------------------------------------------------------------------


class Target:
    """Runs one input through every entry point and checks the documented outcomes."""

    def __init__(self) -> None:
        self.cores = [
            ServerCore(CoreConfig(response_rate=0)),
            ServerCore(CoreConfig(rfc5780=GRID, software="fuzz", response_rate=0)),
            ServerCore(CoreConfig(response_rate=5, response_burst=10)),
        ]
        self.calls = 0

    def __call__(self, data: bytes) -> bool:
        """Check one input; True when it decoded (worth keeping in the corpus)."""
        self.calls += 1
        decoded = self.check_decode(data)
        self.check_framer(data)
        self.check_core(data)
        return decoded

    @staticmethod
    def check_decode(data: bytes) -> bool:
        try:
            msg = decode(data)
        except StunParseError:
            return False
        again = decode(msg.encode())
        if again != msg:
            raise AssertionError(f"re-encode changed the message: {msg!r} -> {again!r}")
        for result in (
            check_integrity(msg, KEY),
            check_integrity_sha256(msg, KEY),
            check_fingerprint(msg),
        ):
            if not isinstance(result, bool):
                raise AssertionError("integrity check returned a non-bool")
        return True

    def check_framer(self, data: bytes) -> None:
        framer = StreamFramer(max_frame=(64, 200, 65555)[self.calls % 3])
        cut = self.calls % (len(data) + 1)
        fed = taken = 0
        for chunk in (data[:cut], data[cut:], data):
            fed += len(chunk)
            try:
                frames = framer.feed(chunk)
            except FramingError:
                return
            for frame in frames:
                if frame[0] >= 0x50:
                    raise AssertionError("framer returned a frame starting with 0x50-0xFF")
                taken += len(frame) if frame[0] < 0x40 else (len(frame) + 3) & ~3
            if taken + framer.buffered != fed:
                raise AssertionError("framer lost or duplicated bytes")

    def check_core(self, data: bytes) -> None:
        core = self.cores[self.calls % len(self.cores)]
        local = LOCALS[self.calls % len(LOCALS)]
        remote = REMOTES[self.calls % len(REMOTES)]
        now = self.calls / 1000
        self.check_actions(data, core.handle_udp(data, local, remote, now))
        transport = Transport.TCP if self.calls % 2 else Transport.TLS
        self.check_actions(data, core.handle_stream_frame(data, local, remote, transport, now))

    @staticmethod
    def check_actions(data: bytes, actions: Sequence[StreamAction]) -> None:
        if not isinstance(actions, list):
            raise AssertionError("core returned a non-list")
        for action in actions:
            if not isinstance(action, SendTo):
                raise AssertionError("a Binding-only core relayed something")
            response = decode(action.data)
            if response.cls not in (MessageClass.SUCCESS, MessageClass.ERROR):
                raise AssertionError("core sent something that is not a response")
            if response.transaction_id != data[8:20]:
                raise AssertionError("response transaction ID differs from the request's")


# --- drivers -----------------------------------------------------------------------------------


def crash_signature(exc: BaseException) -> str:
    """Exception type and the innermost frame: one line per distinct bug."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__} at {where}: {exc}"


def report_crash(data: bytes, signature: str, crash_dir: Path | None) -> None:
    digest = hashlib.sha1(data, usedforsecurity=False).hexdigest()[:16]
    shown = data.hex() if len(data) <= 256 else f"{data[:128].hex()}... ({len(data)} bytes)"
    print(f"CRASH {digest}: {signature}\n  input={shown}", flush=True)
    traceback.print_exc(file=sys.stdout)
    if crash_dir is not None:
        crash_dir.mkdir(parents=True, exist_ok=True)
        (crash_dir / f"crash-{digest}.bin").write_bytes(data)


def run_builtin(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    corpus = seed_corpus(rng)
    seeds = len(corpus)
    target = Target()
    crashes: dict[str, int] = {}
    start = last = time.monotonic()
    deadline = start + args.seconds
    inputs = 0
    while True:
        now = time.monotonic()
        if now >= deadline or len(crashes) >= args.max_crashes:
            break
        if now - last >= args.report:
            rate = inputs / (now - start)
            print(f"{now - start:7.1f}s  {inputs} inputs  {rate:,.0f}/s  corpus {len(corpus)}")
            last = now
        for _ in range(500):
            data = (
                random_input(rng) if rng.random() < 0.2 else mutate(rng, rng.choice(corpus), corpus)
            )
            inputs += 1
            try:
                keep = target(data)
            except Exception as exc:
                signature = crash_signature(exc)
                if signature not in crashes:
                    report_crash(data, signature, args.crash_dir)
                crashes[signature] = crashes.get(signature, 0) + 1
                continue
            if keep and len(data) <= 2048 and len(corpus) < MAX_CORPUS and rng.random() < 0.1:
                corpus.append(data)
    elapsed = time.monotonic() - start
    print(
        f"done: {inputs} inputs in {elapsed:.1f}s ({inputs / elapsed:,.0f} inputs/s), "
        f"corpus {seeds} -> {len(corpus)}, {len(crashes)} distinct crash(es)"
    )
    for signature, count in crashes.items():
        print(f"  {count:6d} x {signature}")
    return 1 if crashes else 0


def run_atheris(args: argparse.Namespace, extra: list[str]) -> int:
    atheris = importlib.import_module("atheris")
    target = Target()

    def one_input(data: bytes) -> None:
        target(data)

    atheris.Setup([sys.argv[0], f"-max_total_time={args.seconds}", *extra], one_input)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run")
    parser.add_argument("--seed", type=int, default=0, help="random seed (builtin mode)")
    parser.add_argument("--report", type=float, default=10.0, help="seconds between progress lines")
    parser.add_argument("--max-crashes", type=int, default=20, help="stop after this many")
    parser.add_argument("--crash-dir", type=Path, default=None, help="save crashing inputs here")
    parser.add_argument(
        "--atheris", action="store_true", help="use atheris (coverage-guided) if installed"
    )
    args, extra = parser.parse_known_args(argv)
    if args.atheris:
        try:
            return run_atheris(args, [e for e in extra if e != "--"])
        except ImportError:
            print("atheris is not installed; using the built-in fuzzer")
    return run_builtin(args)


if __name__ == "__main__":
    sys.exit(main())
