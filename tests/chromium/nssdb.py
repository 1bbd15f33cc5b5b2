"""Write an NSS certificate database that trusts given certificates (what ``certutil -N
--empty-password`` then ``certutil -A -t TRUST -n NICK -i CERT`` would do, without needing
libnss3-tools): ``python nssdb.py DBDIR TRUST:CERT.pem ...``.

Chromium on Linux reads the user's NSS database in ``$HOME/.pki/nssdb`` and uses the
certificates trusted there (besides its own root store) to verify TLS servers. NSS itself is
called through ctypes from the ``libnss3`` / ``libsmime3`` that Chromium also links. Run it in a
child process: NSS keeps process-wide state.

TRUST is an NSS trust string for SSL, as certutil takes it: ``C,,`` (a trusted CA) or
``P,,`` (a trusted peer: this very certificate, self-signed or not, is trusted for a server).
"""

from __future__ import annotations

import ctypes
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path


class _Trust(ctypes.Structure):
    """NSS ``CERTCertTrust``."""

    _fields_ = [
        ("ssl_flags", ctypes.c_uint),
        ("email_flags", ctypes.c_uint),
        ("object_signing_flags", ctypes.c_uint),
    ]


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"NSS: {what} failed")


def write_db(directory: Path, items: Sequence[tuple[str, Path]]) -> None:
    """Create (or open) the SQL database in ``directory`` with an empty password and add each
    (trust string, PEM certificate) of ``items``."""
    nss = ctypes.CDLL("libnss3.so")
    smime = ctypes.CDLL("libsmime3.so")
    ptr = ctypes.c_void_p
    nss.NSS_InitReadWrite.argtypes = [ctypes.c_char_p]
    nss.PK11_GetInternalKeySlot.restype = ptr
    nss.PK11_NeedUserInit.argtypes = [ptr]
    nss.PK11_InitPin.argtypes = [ptr, ctypes.c_char_p, ctypes.c_char_p]
    nss.PK11_Authenticate.argtypes = [ptr, ctypes.c_int, ptr]
    smime.CERT_DecodeCertFromPackage.argtypes = [ctypes.c_char_p, ctypes.c_int]
    smime.CERT_DecodeCertFromPackage.restype = ptr
    nss.PK11_ImportCert.argtypes = [ptr, ptr, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    nss.CERT_GetDefaultCertDB.restype = ptr
    nss.CERT_DecodeTrustString.argtypes = [ctypes.POINTER(_Trust), ctypes.c_char_p]
    nss.CERT_ChangeCertTrust.argtypes = [ptr, ptr, ctypes.POINTER(_Trust)]
    nss.CERT_DestroyCertificate.argtypes = [ptr]
    nss.PK11_FreeSlot.argtypes = [ptr]

    directory.mkdir(parents=True, exist_ok=True)
    _check(nss.NSS_InitReadWrite(f"sql:{directory}".encode()), "NSS_InitReadWrite")
    slot = nss.PK11_GetInternalKeySlot()
    try:
        if nss.PK11_NeedUserInit(slot):
            _check(nss.PK11_InitPin(slot, None, b""), "PK11_InitPin")
        _check(nss.PK11_Authenticate(slot, 1, None), "PK11_Authenticate")
        for number, (trust_string, pem) in enumerate(items):
            der = ssl.PEM_cert_to_DER_cert(pem.read_text())
            cert = smime.CERT_DecodeCertFromPackage(der, len(der))
            if not cert:
                raise RuntimeError(f"NSS: cannot decode {pem}")
            try:
                nick = f"stunturn-test-{number}".encode()
                _check(nss.PK11_ImportCert(slot, cert, 0, nick, 0), "PK11_ImportCert")
                trust = _Trust()
                _check(
                    nss.CERT_DecodeTrustString(ctypes.byref(trust), trust_string.encode()),
                    f"CERT_DecodeTrustString({trust_string!r})",
                )
                certdb = nss.CERT_GetDefaultCertDB()
                status = nss.CERT_ChangeCertTrust(certdb, cert, ctypes.byref(trust))
                _check(status, "CERT_ChangeCertTrust")
            finally:
                nss.CERT_DestroyCertificate(cert)
    finally:
        nss.PK11_FreeSlot(slot)
    _check(nss.NSS_Shutdown(), "NSS_Shutdown")


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    items = []
    for arg in argv[1:]:
        trust, _, pem = arg.partition(":")
        items.append((trust, Path(pem)))
    write_db(Path(argv[0]), items)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
