"""WireGuard keys and a wg-quick client configuration whose Endpoint is autovpn's UDP relay.

    autovpn wg keys                       a key pair (and with --preshared, a preshared key)
    autovpn wg config --server-public-key KEY --address 10.66.0.2/32 \\
        --tunnel-server-ip 203.0.113.7 > wg0.conf

Keys are X25519 made with ``cryptography``, in WireGuard's base64 form.  With AllowedIPs
covering everything, the wss connection to the tunnel server must not itself enter the
WireGuard tunnel (a routing loop): ``--tunnel-server-ip`` removes that address from AllowedIPs.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from autovpn.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class KeyPair:
    private: str
    public: str


def generate_keypair() -> KeyPair:
    key = X25519PrivateKey.generate()
    private = key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    public = key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return KeyPair(base64.b64encode(private).decode(), base64.b64encode(public).decode())


def public_key(private: str) -> str:
    key = X25519PrivateKey.from_private_bytes(decode_key(private, "private key"))
    raw = key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def generate_preshared_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def decode_key(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(what, "expected a WireGuard key: 32 bytes in base64 (44 characters)")
    return raw


def allowed_ips(include: list[str], exclude: list[str]) -> list[IPNetwork]:
    """``include`` minus ``exclude`` (e.g. everything but the tunnel server's address)."""
    try:
        nets = [ipaddress.ip_network(n, strict=False) for n in include]
        holes = [ipaddress.ip_network(n, strict=False) for n in exclude]
    except ValueError as exc:
        raise ConfigError("allowed-ips", str(exc)) from None
    for hole in holes:
        result: list[IPNetwork] = []
        for net in nets:
            if net.version == hole.version and hole.subnet_of(net):  # type: ignore[arg-type]
                result.extend(net.address_exclude(hole))  # type: ignore[arg-type]
            elif net.version == hole.version and net.subnet_of(hole):  # type: ignore[arg-type]
                continue
            else:
                result.append(net)
        nets = result
    return sorted(nets, key=lambda n: (n.version, n.network_address, n.prefixlen))


def client_config(
    *,
    private_key: str,
    address: str,
    server_public_key: str,
    endpoint: str,
    allowed: list[IPNetwork],
    preshared_key: str | None = None,
    dns: list[str] | None = None,
    keepalive: int = 25,
    mtu: int | None = None,
) -> str:
    decode_key(private_key, "private key")
    decode_key(server_public_key, "server public key")
    if preshared_key:
        decode_key(preshared_key, "preshared key")
    try:
        ipaddress.ip_interface(address)
    except ValueError:
        raise ConfigError(
            "address", f"{address!r} is not an interface address like 10.66.0.2/32"
        ) from None
    lines = ["[Interface]", f"PrivateKey = {private_key}", f"Address = {address}"]
    if dns:
        lines.append(f"DNS = {', '.join(dns)}")
    if mtu:
        lines.append(f"MTU = {mtu}")
    lines += ["", "[Peer]", f"PublicKey = {server_public_key}"]
    if preshared_key:
        lines.append(f"PresharedKey = {preshared_key}")
    lines += [
        f"Endpoint = {endpoint}",
        f"AllowedIPs = {', '.join(str(n) for n in allowed)}",
        f"PersistentKeepalive = {keepalive}",
    ]
    return "\n".join(lines) + "\n"
