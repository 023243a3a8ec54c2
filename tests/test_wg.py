"""``autovpn wg``: keys and a wg-quick client config for the UDP relay."""

from __future__ import annotations

import base64
import ipaddress
import subprocess
import sys

import pytest

from autovpn import wg
from autovpn.errors import ConfigError


def test_keypair_is_x25519_in_wireguard_base64() -> None:
    pair = wg.generate_keypair()
    assert len(base64.b64decode(pair.private)) == 32
    assert wg.public_key(pair.private) == pair.public
    assert len(base64.b64decode(wg.generate_preshared_key())) == 32


def test_allowed_ips_keep_the_tunnel_server_out_of_the_tunnel() -> None:
    nets = wg.allowed_ips(["0.0.0.0/0", "::/0"], ["203.0.113.7/32"])
    server = ipaddress.ip_address("203.0.113.7")
    assert not any(server in n for n in nets)
    # everything else is still covered, exactly once
    total = sum(n.num_addresses for n in nets if n.version == 4)
    assert total == 2**32 - 1
    assert ipaddress.ip_network("::/0") in nets


def test_bad_keys_and_addresses_are_config_errors() -> None:
    pair = wg.generate_keypair()
    with pytest.raises(ConfigError, match="32 bytes"):
        wg.client_config(
            private_key="nope",
            address="10.0.0.2/32",
            server_public_key=pair.public,
            endpoint="127.0.0.1:51820",
            allowed=[],
        )
    with pytest.raises(ConfigError, match="interface address"):
        wg.client_config(
            private_key=pair.private,
            address="ten",
            server_public_key=pair.public,
            endpoint="127.0.0.1:51820",
            allowed=[],
        )


def test_cli_writes_a_config_pointing_at_the_relay() -> None:
    server = wg.generate_keypair()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "autovpn",
            "wg",
            "config",
            "--server-public-key",
            server.public,
            "--address",
            "10.66.0.2/32",
            "--endpoint",
            "127.0.0.1:51999",
            "--new-preshared-key",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    fields = dict(
        line.split(" = ", 1) for line in out.splitlines() if " = " in line and line[0] != "#"
    )
    assert fields["Endpoint"] == "127.0.0.1:51999"
    assert fields["PublicKey"] == server.public
    assert len(base64.b64decode(fields["PresharedKey"])) == 32
    assert wg.public_key(fields["PrivateKey"]) in out  # the header names this peer's key
