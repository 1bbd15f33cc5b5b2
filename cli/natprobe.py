"""``natprobe``: NAT behaviour discovery (not built yet)."""

from __future__ import annotations

import sys


def main() -> None:
    """Refuse honestly until the natprobe feature lands."""
    sys.stderr.write("natprobe is not built yet (tracked as issue #4); it does nothing.\n")
    sys.exit(3)
