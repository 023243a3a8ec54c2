"""curl, an independent client, through both listeners and the real TLS tunnel.

SOCKS5 with the name resolved by the proxy (``--socks5-hostname``, ``socks5h://``), the HTTP
proxy with CONNECT to an HTTPS origin (certificate from the test CA) and with absolute-form
``http://`` requests (keep-alive, chunked upload, HEAD, 204), with and without credentials.
curl's exit codes are documented in curl(1): 97 is a SOCKS proxy handshake failure, 56 a
failure receiving network data (here: the CONNECT answered 407).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from autovpn.routing.router import Mode
from tests.conftest import Certs, curl, engine, http_port, run, socks_port
from tests.http_origin import http_origin

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]

USERS = (("alice", "s3cret"),)


# --- SOCKS5 --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.GLOBAL, Mode.DIRECT])
def test_socks5_hostname_to_https(certs: Certs, mode: Mode) -> None:
    async def main() -> None:
        with http_origin(certs) as origin:
            async with engine(certs, mode=mode) as eng:
                url = f"https://localhost:{origin.port}/hello"
                for proxy in (
                    ["--socks5-hostname", f"127.0.0.1:{socks_port(eng)}"],
                    ["-x", f"socks5h://127.0.0.1:{socks_port(eng)}"],
                ):
                    rc, out, err = await curl("--cacert", str(certs.ca), *proxy, url)
                    assert (rc, out) == (0, "hello /hello"), err

    run(main())


def test_socks5_credentials(certs: Certs) -> None:
    async def main() -> None:
        with http_origin(certs) as origin:
            async with engine(certs, users=USERS) as eng:
                url = f"https://localhost:{origin.port}/hello"
                port = socks_port(eng)
                rc, out, err = await curl(
                    "--cacert", str(certs.ca), "-x", f"socks5h://alice:s3cret@127.0.0.1:{port}", url
                )
                assert (rc, out) == (0, "hello /hello"), err
                rc, out, err = await curl(
                    "--cacert",
                    str(certs.ca),
                    "--socks5-hostname",
                    f"127.0.0.1:{port}",
                    "--proxy-user",
                    "alice:s3cret",
                    url,
                )
                assert (rc, out) == (0, "hello /hello"), err
                for bad in (
                    f"socks5h://alice:WRONG@127.0.0.1:{port}",
                    f"socks5h://127.0.0.1:{port}",
                ):
                    rc, out, err = await curl("--cacert", str(certs.ca), "-x", bad, url)
                    assert rc == 97, err

    run(main())


# --- HTTP proxy: CONNECT -------------------------------------------------------------------


def test_http_connect_to_https(certs: Certs) -> None:
    async def main() -> None:
        with http_origin(certs) as origin:
            async with engine(certs) as eng:
                rc, out, err = await curl(
                    "--cacert",
                    str(certs.ca),
                    "-x",
                    f"http://127.0.0.1:{http_port(eng)}",
                    f"https://localhost:{origin.port}/hello",
                )
                assert (rc, out) == (0, "hello /hello"), err

    run(main())


def test_http_connect_credentials(certs: Certs) -> None:
    async def main() -> None:
        with http_origin(certs) as origin:
            async with engine(certs, users=USERS) as eng:
                url = f"https://localhost:{origin.port}/hello"
                port = http_port(eng)
                rc, out, err = await curl(
                    "--cacert", str(certs.ca), "-x", f"http://alice:s3cret@127.0.0.1:{port}", url
                )
                assert (rc, out) == (0, "hello /hello"), err
                for bad in (f"http://alice:WRONG@127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
                    rc, out, err = await curl("--cacert", str(certs.ca), "-x", bad, url)
                    assert rc == 56 and "407" in err, err

    run(main())


# --- HTTP proxy: absolute-form forwarding --------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.GLOBAL, Mode.DIRECT])
def test_plain_http_two_urls_share_one_connection(certs: Certs, mode: Mode) -> None:
    async def main() -> None:
        with http_origin() as origin:
            async with engine(certs, mode=mode) as eng:
                base = f"http://127.0.0.1:{origin.port}"
                rc, out, err = await curl(
                    "-x",
                    f"http://127.0.0.1:{http_port(eng)}",
                    "-w",
                    " %{http_code} %{num_connects}\n",
                    f"{base}/hello/1",
                    f"{base}/hello/2",
                )
                assert rc == 0, err
                # curl opened one connection to the proxy for both transfers...
                assert out.splitlines() == ["hello /hello/1 200 1", "hello /hello/2 200 0"]
            # ...and the proxy one to the origin.
            assert origin.connections == 1

    run(main())


def test_plain_http_credentials(certs: Certs) -> None:
    async def main() -> None:
        with http_origin() as origin:
            async with engine(certs, users=USERS) as eng:
                url = f"http://127.0.0.1:{origin.port}/hello"
                port = http_port(eng)
                rc, out, err = await curl("-x", f"http://alice:s3cret@127.0.0.1:{port}", url)
                assert (rc, out) == (0, "hello /hello"), err
                for bad in (f"http://alice:WRONG@127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
                    rc, out, err = await curl(
                        "-x", bad, "-o", "/dev/null", "-w", "%{http_code}", url
                    )
                    assert (rc, out) == (0, "407"), err
            assert len(origin.requests) == 1
            assert "Proxy-Authorization" not in origin.requests[0][2]

    run(main())


def test_plain_http_chunked_upload_head_and_204(certs: Certs, tmp_path: Path) -> None:
    upload = tmp_path / "upload.bin"
    data = bytes(range(256)) * 4096  # 1 MiB
    upload.write_bytes(data)

    async def main() -> None:
        with http_origin() as origin:
            async with engine(certs) as eng:
                proxy = ["-x", f"http://127.0.0.1:{http_port(eng)}"]
                base = f"http://127.0.0.1:{origin.port}"
                rc, out, err = await curl(
                    *proxy,
                    "-H",
                    "Transfer-Encoding: chunked",
                    "-H",
                    "Expect:",
                    "--data-binary",
                    f"@{upload}",
                    f"{base}/upload",
                )
                assert (rc, out) == (0, f"{len(data)} {hashlib.sha256(data).hexdigest()}"), err
                assert origin.requests[-1][2].get("Transfer-Encoding") == "chunked"
                rc, out, err = await curl(*proxy, "--head", f"{base}/hello")
                assert rc == 0, err
                assert out.startswith("HTTP/1.1 200") and "Content-Length: 12" in out
                rc, out, err = await curl(
                    *proxy, "-w", "%{http_code}", f"{base}/204", "-w", "%{http_code}", f"{base}/304"
                )
                assert (rc, out) == (0, "204304"), err

    run(main())
