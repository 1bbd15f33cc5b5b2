"""Batched UDP I/O with Linux ``recvmmsg``/``sendmmsg`` through ctypes.

Python's socket module reads and writes one datagram per system call and builds a ``(host,
port)`` tuple for every one. On a STUN server the kernel's per-datagram work dominates, but
those per-call costs are most of what remains, so the UDP listeners of the hot path read up to
:data:`BATCH` datagrams per system call into one scratch area and answer them with one
``sendmmsg``. Addresses stay raw ``sockaddr`` bytes unless a datagram leaves the fast path.

One :class:`BatchIO` per worker serves every socket of that worker: processing is synchronous,
so the scratch area is reused socket after socket. When the platform lacks the calls,
:func:`available` is False and the listeners use plain ``recvfrom``/``sendto``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import struct
import sys

BATCH = 32
SLOT = 65536
"""Bytes per datagram slot: the largest UDP payload, so nothing is ever truncated."""
NAME = 28
"""Bytes per address slot: sizeof(struct sockaddr_in6)."""
MSG_DONTWAIT = 0x40


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.POINTER(_IOVec)),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]


def _load() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.recvmmsg.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p
        ]  # fmt: skip
        libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load()


def available() -> bool:
    """Whether batched I/O can be used here (Linux with recvmmsg/sendmmsg)."""
    return _LIBC is not None and os.environ.get("STUNTURN_NO_MMSG") != "1"


_MSG_SIZE = ctypes.sizeof(_MMsgHdr)
MSG_SIZE = _MSG_SIZE
LEN_OFFSET = _MMsgHdr.len.offset
"""Where ``msg_len`` of message ``i`` sits in :attr:`BatchIO.rxhdrs`: ``i * MSG_SIZE +
LEN_OFFSET``."""
_NAMELEN_OFFSET = _MsgHdr.namelen.offset
_U32 = struct.Struct("I")
_SIZE_T = struct.Struct("N")
_IOV = struct.Struct("PN")
_IOV_SIZE = ctypes.sizeof(_IOVec)
_IOV_LEN_OFFSET = _IOVec.len.offset
_PORT = struct.Struct("!H")


def address_to_sockaddr(addr: tuple[str, int]) -> bytes:
    """Encode ``(host, port)`` as a raw ``sockaddr_in``/``sockaddr_in6`` (Linux layout)."""
    host, port = addr
    if ":" in host:
        return (
            socket.AF_INET6.to_bytes(2, sys.byteorder)
            + port.to_bytes(2, "big")
            + bytes(4)
            + socket.inet_pton(socket.AF_INET6, host)
            + bytes(4)
        )
    return (
        socket.AF_INET.to_bytes(2, sys.byteorder)
        + port.to_bytes(2, "big")
        + socket.inet_aton(host)
        + bytes(8)
    )


def sockaddr_to_address(name: bytes | memoryview) -> tuple[str, int]:
    """Decode a raw ``sockaddr_in``/``sockaddr_in6`` into ``(host, port)``."""
    family = name[0] | (name[1] << 8)
    port = (name[2] << 8) | name[3]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, bytes(name[4:8])), port
    return socket.inet_ntop(socket.AF_INET6, bytes(name[8:24])), port


class BatchIO:
    """Scratch buffers and prepared message headers for one worker.

    After :meth:`recv` returns ``n``, datagram ``i`` is ``rx[i * SLOT : i * SLOT + length(i)]``
    from the address ``names[i * NAME : (i + 1) * NAME]``. Responses are written with
    :meth:`queue` into the transmit slots and all sent by :meth:`flush` to the address of the
    datagram they answer.
    """

    def __init__(self, batch: int = BATCH) -> None:
        if _LIBC is None:
            raise OSError("recvmmsg/sendmmsg are not available")
        self.batch = batch
        self._rxbuf = (ctypes.c_char * (batch * SLOT))()
        self._names = (ctypes.c_char * (batch * NAME))()
        self._rxiov = (_IOVec * batch)()
        self._rxmsgs = (_MMsgHdr * batch)()
        self._txbuf = (ctypes.c_char * (batch * SLOT))()
        self._txiov = (_IOVec * batch)()
        self._txmsgs = (_MMsgHdr * batch)()
        rx, names, tx = (ctypes.addressof(b) for b in (self._rxbuf, self._names, self._txbuf))
        for i in range(batch):
            self._rxiov[i].base, self._rxiov[i].len = rx + i * SLOT, SLOT
            self._txiov[i].base = tx + i * SLOT
            for msgs, iov in ((self._rxmsgs, self._rxiov), (self._txmsgs, self._txiov)):
                msgs[i].hdr.name = names + i * NAME
                msgs[i].hdr.namelen = NAME
                msgs[i].hdr.iov = ctypes.pointer(iov[i])
                msgs[i].hdr.iovlen = 1
        self.rx = memoryview(self._rxbuf).cast("B")
        self.tx = memoryview(self._txbuf).cast("B")
        self.names = memoryview(self._names).cast("B")
        self.rxhdrs = memoryview(self._rxmsgs).cast("B")
        self._recvmmsg = _LIBC.recvmmsg
        self._sendmmsg = _LIBC.sendmmsg
        self._rxaddr = ctypes.addressof(self._rxmsgs)
        self._txaddr = ctypes.addressof(self._txmsgs)
        self._pending: list[int] = []
        self._filled = batch
        # A second set of headers over the same transmit slots, all addressed to one
        # destination (a relay's client): see send_to().
        self._dest = (ctypes.c_char * NAME)()
        self._destmsgs = (_MMsgHdr * batch)()
        for i in range(batch):
            hdr = self._destmsgs[i].hdr
            hdr.name = ctypes.addressof(self._dest)
            hdr.namelen = NAME
            hdr.iov = ctypes.pointer(self._txiov[i])
            hdr.iovlen = 1
        self._destaddr = ctypes.addressof(self._destmsgs)
        self._destmv = memoryview(self._dest).cast("B")
        # A third set, whose iovecs point into the receive slots, to forward received payloads
        # without copying them: see send_received().
        self._fwdiov = (_IOVec * batch)()
        self._fwdmsgs = (_MMsgHdr * batch)()
        for i in range(batch):
            hdr = self._fwdmsgs[i].hdr
            hdr.name = ctypes.addressof(self._dest)
            hdr.namelen = NAME
            hdr.iov = ctypes.pointer(self._fwdiov[i])
            hdr.iovlen = 1
        self._fwdaddr = ctypes.addressof(self._fwdmsgs)
        self._fwdiovs = memoryview(self._fwdiov).cast("B")
        self._rxbase = rx
        self._txiovs = memoryview(self._txiov).cast("B")

    def recv(self, fd: int, v6: bool = True) -> int:
        """Read up to ``batch`` datagrams without blocking; 0 when none is waiting.

        ``v6=False`` promises an AF_INET socket, whose source addresses fit in any slot.
        """
        n: int
        if not v6:
            # The kernel sets msg_namelen of each slot it fills to the address length: 16
            # here, too short for an IPv6 address. Remember how far that may have gone.
            n = self._recvmmsg(fd, self._rxaddr, self.batch, MSG_DONTWAIT, None)
            self._filled = max(self._filled, n)
            return max(n, 0)
        hdrs = self.rxhdrs
        pack = _U32.pack_into
        # Give the slots the kernel rewrote since the last reset their full length again.
        for i in range(self._filled):
            pack(hdrs, i * _MSG_SIZE + _NAMELEN_OFFSET, NAME)
        n = self._recvmmsg(fd, self._rxaddr, self.batch, MSG_DONTWAIT, None)
        if n < 0:
            self._filled = 0
            return 0
        self._filled = n
        return n

    def length(self, i: int) -> int:
        """Bytes received into slot ``i``."""
        return int(_U32.unpack_from(self.rxhdrs, i * _MSG_SIZE + LEN_OFFSET)[0])

    def name(self, i: int) -> bytes:
        """The raw sockaddr of datagram ``i`` (its first 16 bytes for IPv4, 28 for IPv6)."""
        start = i * NAME
        if self.names[start] == socket.AF_INET:
            return bytes(self.names[start : start + 16])
        return bytes(self.names[start : start + NAME])

    def address(self, i: int) -> tuple[str, int]:
        """``(host, port)`` of datagram ``i``."""
        start = i * NAME
        return sockaddr_to_address(self.names[start : start + NAME])

    def queue(self, i: int, length: int) -> None:
        """Send tx slot ``i`` (``length`` bytes already written) back to datagram ``i``'s source."""
        _SIZE_T.pack_into(self._txiovs, i * _IOV_SIZE + _IOV_LEN_OFFSET, length)
        self._pending.append(i)

    def set_length(self, i: int, length: int) -> None:
        """Length of transmit slot ``i`` (for :meth:`send_to`)."""
        _SIZE_T.pack_into(self._txiovs, i * _IOV_SIZE + _IOV_LEN_OFFSET, length)

    def send_to(self, fd: int, count: int, name: bytes) -> int:
        """Send transmit slots ``0..count-1`` to the one raw sockaddr ``name``; returns how
        many the kernel refused."""
        self._destmv[: len(name)] = name
        sent: int = self._sendmmsg(fd, self._destaddr, count, MSG_DONTWAIT)
        return count - max(sent, 0)

    def send_received(self, fd: int, items: list[int], skip: int, name: bytes) -> int:
        """Send parts of received datagrams to the raw sockaddr ``name`` in one call.

        ``items`` is flat: slot, length, slot, length...; each datagram is sent from byte
        ``skip`` of its receive slot (4: a ChannelData payload without its header). Returns
        how many the kernel refused.
        """
        count = len(items) // 2
        iovs = self._fwdiovs
        base = self._rxbase + skip
        for k in range(count):
            _IOV.pack_into(iovs, k * _IOV_SIZE, base + items[2 * k] * SLOT, items[2 * k + 1])
        self._destmv[: len(name)] = name
        sent: int = self._sendmmsg(fd, self._fwdaddr, count, MSG_DONTWAIT)
        return count - max(sent, 0)

    def flush(self, fd: int) -> int:
        """Send everything queued; returns how many datagrams the kernel refused."""
        pending = self._pending
        if not pending:
            return 0
        self._pending = []
        # Queued slots are in increasing order but may have gaps; send runs of them.
        failed = 0
        start = 0
        while start < len(pending):
            end = start
            while end + 1 < len(pending) and pending[end + 1] == pending[end] + 1:
                end += 1
            first, count = pending[start], end - start + 1
            sent = self._sendmmsg(fd, self._txaddr + first * _MSG_SIZE, count, MSG_DONTWAIT)
            if sent < count:
                failed += count - max(sent, 0)
            start = end + 1
        return failed
