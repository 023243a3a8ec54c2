"""TLS contexts for the tunnel, and the private CA of ``autovpn cert`` and the embedded default.

Verification is on by default.  ``insecure=True`` turns off both the chain and the host name
check and says so in the log: it protects against nothing but a passive eavesdropper.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
from pathlib import Path

from autovpn.errors import ConfigError
from autovpn.pem import certificate_problem, private_key_problem

log = logging.getLogger("autovpn.tls")


def server_context(
    certificate: Path, private_key: Path, client_ca: Path | None = None
) -> ssl.SSLContext:
    _check_pem("tls-certificate", certificate_problem(certificate))
    _check_pem("tls-private-key", private_key_problem(private_key))
    if client_ca is not None:
        _check_pem("tls-client-ca-certs", certificate_problem(client_ca))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(certificate), str(private_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "tls-certificate", f"cannot load {certificate} / {private_key}: {exc}"
        ) from exc
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("tls-client-ca-certs", f"cannot load {client_ca}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    # h2 for wstunnel's HTTP/2 transport (https:// clients); our own clients ask for http/1.1.
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def client_context(
    ca_file: Path | None = None,
    *,
    insecure: bool = False,
    certificate: Path | None = None,
    private_key: Path | None = None,
) -> ssl.SSLContext:
    if ca_file is not None:
        _check_pem("tls-ca", certificate_problem(ca_file))
    if certificate is not None:
        _check_pem("tls-certificate", certificate_problem(certificate))
        _check_pem("tls-private-key", private_key_problem(private_key or certificate))
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls-ca", f"cannot load {ca_file}: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        log.warning(
            "--insecure: the tunnel server's certificate is NOT verified; anyone on the path "
            "can impersonate the server and read every tunnelled byte"
        )
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if certificate is not None:
        try:
            ctx.load_cert_chain(str(certificate), str(private_key) if private_key else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("tls-certificate", f"cannot load {certificate}: {exc}") from exc
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _check_pem(key: str, problem: str | None) -> None:
    """OpenSSL's own words for a file of the wrong kind name neither the file nor the fix."""
    if problem is not None:
        raise ConfigError(key, problem)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (where the platform has POSIX modes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    try:
        path.chmod(0o600)
    except OSError:  # pragma: no cover - Windows ACLs: the user's profile directory protects it
        pass
    path.write_bytes(data)


def make_private_ca(
    directory: Path, names: list[str], *, days: int = 825
) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate it signs, for ``names`` (DNS names or IPs).

    Writes ``ca.pem``, ``server.pem`` and ``server.key`` (0600) into ``directory`` and returns
    their paths.  The server uses the last two; clients trust the first with ``--tls-ca``.
    EC P-256, with the extensions that Python's ssl, OpenSSL (curl, nginx) and Chromium expect.
    """
    # cryptography costs ~60 ms to import and only certificate making needs it.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "autovpn private CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = (
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
    )
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    write_private(
        key_path,
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return ca_path, cert_path, key_path
