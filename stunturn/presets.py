"""Named starting points for ``stunturn serve``: ``--preset NAME`` or ``preset = "NAME"``.

A preset is nothing but a set of configuration values laid *under* the configuration file and
the command line: every value it sets can be overridden by giving that option explicitly, and
every option it does not set keeps its ordinary default. docs/deploy.md lists exactly what each
preset sets (a test keeps that table and :data:`PRESETS` in step).

Presets are plain data (no imports from the rest of the package) so that both the config layer
and the documentation can read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True, slots=True)
class Preset:
    """A named layer of configuration values (TOML keys, spelled with dashes)."""

    name: str
    summary: str
    settings: Mapping[str, Any]


PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        preset.name: preset
        for preset in (
            Preset(
                "public-p2p",
                "STUN and TURN on the public Internet for browsers and P2P apps: relays to any "
                "public address, never into special-purpose ranges or the server itself",
                MappingProxyType(
                    {
                        "udp": True,
                        "tcp": True,
                        "turn": True,
                        "allow-peer": [],
                        "deny-peer": [],
                        "allow-loopback-peers": False,
                        "deny-other-peers": False,
                    }
                ),
            ),
            Preset(
                "sfu",
                "TURN in front of media servers (SFU/MCU): relays only to the allow-peer "
                "ranges, which must be given, and denies every other peer",
                MappingProxyType(
                    {
                        "udp": True,
                        "tcp": True,
                        "turn": True,
                        "allow-loopback-peers": False,
                        "deny-other-peers": True,
                    }
                ),
            ),
            Preset(
                "stun-only",
                "A STUN server (address discovery, RFC 5780 with alt-address); no TURN relay",
                MappingProxyType({"udp": True, "tcp": True, "turn": False}),
            ),
        )
    }
)
"""Every preset, by name."""

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)
