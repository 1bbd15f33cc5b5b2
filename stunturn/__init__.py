"""stunturn: a STUN/TURN/ICE toolkit.

The package is layered; imports point one way::

    stunturn_cli -> stunturn.aio -> stunturn.{server,turn,nat,ice} -> stunturn.stun

Only :mod:`stunturn.aio` opens sockets or reads the clock.
"""

__version__ = "0.1.0"
