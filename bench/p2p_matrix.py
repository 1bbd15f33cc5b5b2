"""P2P through real NATs: the flavour matrix, with and without TURN, as a markdown table.

Builds the NAT lab of tests/lab (Linux network namespaces, nftables NATs; needs root, ip, nft,
conntrack): our ``stunturn serve`` (STUN + TURN) on the WAN and, for each of the 15 unordered
pairs of {no NAT, full cone, restricted cone, port-restricted cone, symmetric}, two LANs behind
two routers of those flavours with one host each, plus one LAN per flavour with two hosts (the
same-NAT case). In each repetition every pair runs once with TURN and once without (the peers
are given no TURN server), every NAT's mappings are forgotten between the two, and each peer is
a process in its host's namespace (tests/lab/p2p_peer.py: ``stunturn.p2p.connect`` with
trickle signaling through files) reporting the selected pair and monotonic timestamps.

    python bench/p2p_matrix.py                       # 5 repetitions, table on stdout
    python bench/p2p_matrix.py --repeat 10 --json out.json --parallel 20

Time to connect: from the moment both peer processes are running (hellos written) until both
have selected a pair; it includes gathering, which trickles alongside the checks. Time to
failure: until both have given up. Bounded: each peer exits within 30 s (it is killed at
40 s), and no new repetition starts after ``--time-limit`` seconds.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if __package__ in (None, ""):
    sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

from _common import machine_info  # noqa: E402
from lab.netlab import Lab, lab_unavailable  # noqa: E402
from lab.p2plab import (  # noqa: E402
    NAT_FLAVOURS,
    PAIRS,
    SHORT,
    FlavourPair,
    PairResult,
    build_p2p_lab,
    direct_path_exists,
    pair_id,
    run_pairs,
    workdir,
)

Key = tuple[str, Any]


def run_matrix(
    repeat: int, parallel: int, time_limit: float, keep: bool, quiet: bool
) -> tuple[list[dict[Key, PairResult]], dict[str, Any]]:
    """Build the lab, run ``repeat`` repetitions; returns the results and lab facts."""
    started = time.monotonic()
    rounds: list[dict[Key, PairResult]] = []
    with Lab() as lab, workdir(keep=keep) as base:
        p2p = build_p2p_lab(lab)
        facts = {
            "namespaces": len(lab.namespaces),
            "build_s": round(time.monotonic() - started, 1),
            "server": " ".join(p2p.server.args),
            "logs": str(base) if keep else None,
        }
        for index in range(repeat):
            if index and time.monotonic() - started > time_limit:
                print(f"time limit reached after {index} repetitions", file=sys.stderr)
                break
            t0 = time.monotonic()
            round_dir = base / f"round{index + 1}"
            jobs: list[Any] = [(("turn", pair), pair, p2p.pairs[pair], True) for pair in PAIRS]
            jobs += [(("same", f), (f, f), p2p.same_nat[f], True) for f in NAT_FLAVOURS]
            results = run_pairs(jobs, round_dir, parallel=parallel)
            p2p.reset_nats()
            jobs = [(("no-turn", pair), pair, p2p.pairs[pair], False) for pair in PAIRS]
            results.update(run_pairs(jobs, round_dir, parallel=parallel))
            p2p.reset_nats()
            rounds.append(results)
            if not quiet:
                print(f"repetition {index + 1}: {time.monotonic() - t0:.1f} s", file=sys.stderr)
        facts["total_s"] = round(time.monotonic() - started, 1)
    return rounds, facts


# --- the table ---------------------------------------------------------------------------------


def ms(values: Sequence[float]) -> str:
    """Median (min-max) in ms."""
    if not values:
        return "-"
    med = statistics.median(values) * 1000
    if len(values) == 1:
        return f"{med:.0f}"
    return f"{med:.0f} ({min(values) * 1000:.0f}-{max(values) * 1000:.0f})"


def counted(items: Sequence[str]) -> str:
    """``a`` if all equal, else ``a (3x), b (2x)`` (most frequent first)."""
    counts = collections.Counter(items).most_common()
    if len(counts) == 1:
        return counts[0][0]
    return ", ".join(f"{item} ({n}x)" for item, n in counts)


def expected(pair: FlavourPair, turn: bool) -> str:
    if direct_path_exists(*pair):
        return "direct"
    return "relayed" if turn else "failed"


def summarize(rounds: list[dict[Key, PairResult]], key: Key, turn: bool) -> dict[str, Any]:
    results = [r[key] for r in rounds if key in r]
    pair = results[0].pair
    want = "direct" if key[0] == "same" else expected(pair, turn)
    kinds = [r.kind for r in results]
    return {
        "pair": pair_id(pair),
        "expected": want,
        "kinds": kinds,
        "ok": all(k == want for k in kinds)
        and all(r.data_ok and r.consistent for r in results if r.connected),
        "types": [r.types for r in results if r.connected],
        "connect_s": [r.time_to_connect for r in results if r.time_to_connect is not None],
        "failure_s": [r.time_to_failure for r in results if r.time_to_failure is not None],
        "errors": sorted({str(r.offer.error) for r in results if r.offer.error}),
    }


def markdown(rounds: list[dict[Key, PairResult]]) -> tuple[str, bool]:
    """The tables, and whether every outcome was the expected one."""
    good = True
    lines = [
        "| offerer / answerer | expected | with TURN: path | candidate types (offerer: local -> "
        "remote) | time to connect, ms | without TURN | time to connect / to failure, ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for pair in PAIRS:
        on = summarize(rounds, ("turn", pair), True)
        off = summarize(rounds, ("no-turn", pair), False)
        good = good and on["ok"] and off["ok"]
        mark_on = "" if on["ok"] else " **(unexpected)**"
        mark_off = "" if off["ok"] else " **(unexpected)**"
        off_times = off["connect_s"] if off["expected"] == "direct" else off["failure_s"]
        lines.append(
            f"| {SHORT[pair[0]]} / {SHORT[pair[1]]} | {on['expected']} | "
            f"{counted(on['kinds'])}{mark_on} | {counted(on['types']) if on['types'] else '-'} | "
            f"{ms(on['connect_s'])} | {counted(off['kinds'])}{mark_off} | {ms(off_times)} |"
        )
    lines += [
        "",
        "Two hosts behind the same NAT (no hairpinning), with TURN available:",
        "",
        "| NAT | path | candidate types | time to connect, ms |",
        "| --- | --- | --- | --- |",
    ]
    for flavour in NAT_FLAVOURS:
        same = summarize(rounds, ("same", flavour), True)
        types_ok = all(t == "host -> host" for t in same["types"])
        good = good and same["ok"] and types_ok
        mark = "" if same["ok"] and types_ok else " **(unexpected)**"
        lines.append(
            f"| {SHORT[flavour]} | {counted(same['kinds'])}{mark} | {counted(same['types'])} | "
            f"{ms(same['connect_s'])} |"
        )
    return "\n".join(lines), good


def to_json(rounds: list[dict[Key, PairResult]]) -> list[list[dict[str, Any]]]:
    out = []
    for results in rounds:
        out.append(
            [
                {
                    "run": key[0],
                    "pair": [pair.value for pair in result.pair],
                    "kind": result.kind,
                    "types": result.types,
                    "connect_s": result.time_to_connect,
                    "failure_s": result.time_to_failure,
                    "data_ok": result.data_ok,
                    "offer": result.offer.raw,
                    "answer": result.answer.raw,
                }
                for key, result in results.items()
            ]
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument(
        "--parallel",
        type=int,
        default=20,
        help="flavour pairs running at once (default 20: a whole phase)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=600.0,
        metavar="S",
        help="start no repetition after this many seconds (default 600)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every peer's report here")
    parser.add_argument("--keep-logs", action="store_true", help="keep signaling files and logs")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= 100 or not 1 <= args.parallel <= 40:
        parser.error("--repeat 1-100, --parallel 1-40")
    reason = lab_unavailable()
    if reason is not None:
        print(f"p2p_matrix: no NAT lab here: {reason}", file=sys.stderr)
        return 2
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rounds, facts = run_matrix(
        args.repeat, args.parallel, args.time_limit, args.keep_logs, args.quiet
    )
    table, good = markdown(rounds)
    machine = machine_info()
    print(f"P2P matrix, {when}: {len(rounds)} repetitions, up to {args.parallel} pairs at once")
    print(
        f"machine: {machine['cpu_model']}, {machine['usable_cpus']} CPUs, Linux "
        f"{machine['kernel']}, Python {machine['python']}"
    )
    print(
        f"lab: {facts['namespaces']} namespaces built in {facts['build_s']} s; total "
        f"{facts['total_s']} s; server: stunturn serve {facts['server']}"
    )
    print()
    print(table)
    print()
    print("all as expected" if good else "SOME OUTCOMES ARE NOT AS EXPECTED")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "date": when,
                    "machine": machine,
                    "lab": facts,
                    "flavours": [f.value for f in NAT_FLAVOURS],
                    "rounds": to_json(rounds),
                },
                out,
                indent=1,
            )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
