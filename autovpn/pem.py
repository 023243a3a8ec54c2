"""What a certificate or key file holds, told before OpenSSL is given it.

OpenSSL's own answer to a file of the wrong kind is ``[X509: NO_CERTIFICATE_OR_CRL_FOUND] no
certificate or crl found (_ssl.c:4149)``, which names neither the file nor the remedy.  These
checks read the file's markers only (no parsing, no cryptography): a file that has them but is
broken inside is still OpenSSL's to report.
"""

from __future__ import annotations

import re
from pathlib import Path

_CERTIFICATE = re.compile(rb"-----BEGIN (TRUSTED )?CERTIFICATE-----")
_PRIVATE_KEY = re.compile(rb"-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY-----")
_DER_SEQUENCE = 0x30  # a DER file starts with an ASN.1 SEQUENCE


def _read(path: Path) -> bytes | str:
    try:
        return path.read_bytes()
    except OSError as exc:
        return f"{path}: cannot read: {exc.strerror or exc}"


def _der_hint(data: bytes, kind: str) -> str:
    if data[:1] == bytes([_DER_SEQUENCE]):
        inform = "x509" if kind == "certificate" else "pkey"
        return f" (it looks like DER: convert it with openssl {inform} -inform der -in FILE)"
    return ""


def certificate_problem(path: Path) -> str | None:
    """Why ``path`` is not a PEM certificate (or a bundle of them), or None if it is one."""
    data = _read(path)
    if isinstance(data, str):
        return data
    if _CERTIFICATE.search(data):
        return None
    if _PRIVATE_KEY.search(data):
        return f"{path}: not a PEM certificate: it holds a private key only"
    return (
        f"{path}: not a PEM certificate (no -----BEGIN CERTIFICATE----- line)"
        + _der_hint(data, "certificate")
    )


def private_key_problem(path: Path) -> str | None:
    """Why ``path`` is not a PEM private key (alone or beside its certificate), or None."""
    data = _read(path)
    if isinstance(data, str):
        return data
    if _PRIVATE_KEY.search(data):
        return None
    if _CERTIFICATE.search(data):
        return f"{path}: not a PEM private key: it holds a certificate only"
    return f"{path}: not a PEM private key (no -----BEGIN PRIVATE KEY----- line)" + _der_hint(
        data, "key"
    )
