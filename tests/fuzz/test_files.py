"""Fuzzing the parsers of files an operator (or a list's publisher) writes: the wstunnel
restrictions file, the hosts file, the config file as text, the routing lists' regexes and the
wstunnel JWT's JSON.  Each either returns its value or raises its one documented error type;
nothing else escapes, and nothing takes more than moments.

Inputs that broke one of them are kept in ``tests/corpus/`` and replayed by
``tests/fuzz/test_corpus.py``.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autovpn.config import Config, load_file
from autovpn.errors import ConfigError, RemoteProtocolError
from autovpn.routing.hosts import parse_hosts
from autovpn.routing.lists import ListFormat, parse_list
from autovpn.routing.rules import RuleSet, normalize_host
from autovpn.tunnel.wstunnel.restrictions import Restrictions
from autovpn.wire.wstunnel import Claims, Kind, LocalProtocol

# -- shared pieces --------------------------------------------------------------------------------

#: Characters regexes are made of, weighted towards the ones that nest and repeat.
REGEX_ALPHABET = "()[]{}*+?|^$.\\,:-_ab19"
regex_texts = st.one_of(
    st.text(REGEX_ALPHABET, max_size=40),
    st.builds(lambda n: f"a{{{n}}}", st.integers(0, 1 << 40)),  # repeat counts past 2**32 - 1
    st.builds(lambda n, m: f"a{{{n},{m}}}", st.integers(0, 1 << 40), st.integers(0, 1 << 40)),
    st.builds(lambda n: "(" * n + "a" + ")" * n, st.integers(1, 3000)),  # nesting
    st.builds(lambda n: "[" * n, st.integers(1, 200)),
)
huge_numbers = st.builds(lambda n: "9" * n, st.integers(1, 6000))  # int() refuses > 4300 digits


# -- the wstunnel restrictions file (tunnel/wstunnel/restrictions.py) -----------------------------


class Tagged:
    """A YAML node with a ``!Tag``, as the restrictions file writes its matchers and entries."""

    def __init__(self, tag: str, value: Any) -> None:
        self.tag = tag
        self.value = value


#: A private SafeDumper subclass, so the representer stays local to these tests.
_Dumper: Any = type("_Dumper", (yaml.SafeDumper,), {})


def _represent_tagged(dumper: Any, node: Tagged) -> Any:
    tag = "!" + node.tag
    if isinstance(node.value, dict):
        return dumper.represent_mapping(tag, node.value)
    if isinstance(node.value, list):
        return dumper.represent_sequence(tag, node.value)
    return dumper.represent_scalar(tag, "" if node.value is None else str(node.value))


_Dumper.add_representer(Tagged, _represent_tagged)

yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(),
    st.text(max_size=12),
    regex_texts,
    st.sampled_from(["Tcp", "Udp", "Socks5", "Unix", "HttpProxy", "1..99", "22", "80:8080"]),
    st.sampled_from(["127.0.0.1/32", "::1/128", "10.0.0.0/8", "0.0.0.0/0", "::/0", "x/99"]),
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6), inner, max_size=3)
        | st.builds(Tagged, st.sampled_from(["X", "Any", "Tunnel"]), inner)
    ),
    max_leaves=10,
)
ALLOW_KEYS = ["protocol", "port", "host", "cidr", "port_mapping", "unix_path"]


def _field(name: str) -> st.SearchStrategy[Any]:
    """A value for one field of an allow entry: a good one most of the time, else anything."""
    good: dict[str, st.SearchStrategy[Any]] = {
        "protocol": st.lists(st.sampled_from(["Tcp", "Udp", "Socks5", "Unix", "HttpProxy"])),
        "port": st.lists(st.integers(0, 65535) | st.sampled_from(["1..1024", "22", "0..65535"])),
        "host": regex_texts,
        "cidr": st.lists(st.sampled_from(["127.0.0.1/32", "::1/128", "0.0.0.0/0"])),
        "port_mapping": st.lists(st.sampled_from(["1080:2080", "22:2222"])),
        "unix_path": regex_texts,
    }
    bad = st.one_of(yaml_values, st.lists(huge_numbers), huge_numbers)
    return st.one_of(good[name], good[name], bad)


allow_entries = st.builds(
    Tagged,
    st.sampled_from(["Tunnel", "ReverseTunnel", "Tunnel", "ReverseTunnel", "Nope"]),
    st.one_of(
        st.fixed_dictionaries({}, optional={k: _field(k) for k in ALLOW_KEYS}),
        yaml_values,
    ),
)
matchers = st.one_of(
    st.just(Tagged("Any", None)),
    st.builds(Tagged, st.sampled_from(["PathPrefix", "Authorization"]), regex_texts),
    yaml_values,
)
rules = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=10) | yaml_values,
        "description": st.text(max_size=10) | yaml_values,
        "match": st.lists(matchers, max_size=3) | yaml_values,
        "allow": st.lists(allow_entries, max_size=3) | yaml_values,
    },
)
restriction_documents = st.one_of(
    st.builds(lambda r: {"restrictions": r}, st.lists(rules, max_size=3)),
    st.builds(lambda r: {"restrictions": r}, yaml_values),
    yaml_values,
)


@st.composite
def restriction_texts(draw: st.DrawFn) -> str:
    """A restrictions document, dumped as YAML, then maybe cut or spliced at the text level."""
    text = str(yaml.dump(draw(restriction_documents), Dumper=_Dumper, allow_unicode=True))
    how = draw(st.sampled_from(["as is", "as is", "cut", "splice", "nest"]))
    if how == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif how == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=20)) + text[at:]
    elif how == "nest":
        depth = draw(st.sampled_from([1, 20, 300, 600]))  # PyYAML's stack gives out near 400
        text = "restrictions: " + "[" * depth + "]" * depth
    return text


CLAIMS = [
    Claims("id", LocalProtocol(Kind.TCP), "localhost", 22),
    Claims("id", LocalProtocol(Kind.UDP), "127.0.0.1", 53),
    Claims("id", LocalProtocol(Kind.REVERSE_TCP), "[::1]", 8080),
    Claims("id", LocalProtocol(Kind.REVERSE_UNIX, path="/tmp/x.sock"), "0.0.0.0", 0),
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=restriction_texts())
def test_restrictions_file_is_parsed_or_refused_with_a_config_error(text: str) -> None:
    try:
        restrictions = Restrictions.from_yaml(text, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.key.startswith(("fuzz.yaml", "port")) and exc.reason
        return
    for claims in CLAIMS:  # whatever was accepted can be checked against
        host = claims.host.strip("[]")
        verdict = restrictions.check("prefix", "Bearer x", claims, host)
        if verdict is not None:
            assert 0 <= verdict.bind_port(claims.port) <= 65535


# -- the hosts file (routing/hosts.py) ------------------------------------------------------------

host_addresses = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(["fe80::1%eth0", "::ffff:127.0.0.1", "0.0.0.0", "1.2.3", "::g", "[::1]"]),
    st.text(max_size=10),
)
host_names = st.one_of(
    st.from_regex(r"[A-Za-z0-9_-]{1,20}(\.[A-Za-z0-9_-]{1,20}){0,3}\.?", fullmatch=True),
    st.text(max_size=70),
    st.builds(lambda n: "a" * n, st.integers(60, 300)),  # labels over 63, names over 253
)
hosts_lines = st.one_of(
    st.builds(
        lambda a, names, sep, comment: a + sep + sep.join(names) + comment,
        host_addresses,
        st.lists(host_names, max_size=4),
        st.sampled_from([" ", "\t", "  \t ", "\u3000", "\x0b"]),
        st.sampled_from(["", " # comment", "#", "# \x00"]),
    ),
    st.text(max_size=40),
)


@settings(max_examples=500, deadline=None)
@given(lines=st.lists(hosts_lines, max_size=20), newline=st.sampled_from(["\n", "\r\n", "\r"]))
def test_hosts_file_never_raises_and_keeps_only_addresses(lines: list[str], newline: str) -> None:
    table = parse_hosts(newline.join(lines))
    for name, addresses in table.items():
        assert name and name == name.lower() and not name.endswith(".")
        assert normalize_host(name) == name or not name.isascii()
        assert addresses and len(set(addresses)) == len(addresses)
        for address in addresses:
            ipaddress.ip_address(address)  # every address kept parses (zone ids included)


# -- the config file, as text (config.load_file) --------------------------------------------------

TEMPLATE = """\
mode = "smart"
[client]
server = "wss://127.0.0.1:8443"
pool_size = {number}
listen = ["socks5://127.0.0.1:1080"]
[routing]
rules = ["regex:{regex}=direct", "domain:x.test=proxy"]
proxy_add = [{nested}]
"""


@st.composite
def config_texts(draw: st.DrawFn) -> str:
    how = draw(st.sampled_from(["template", "template", "bytes", "cut", "nested"]))
    if how == "bytes":
        return draw(st.binary(max_size=200)).decode("latin-1")
    if how == "nested":
        depth = draw(st.integers(1, 3000))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a=", "}")]))
        return "x = " + opener * depth + "1" * (opener == "{a=") + closer * depth + "\n"
    regex = draw(regex_texts).replace("\\", "\\\\").replace('"', '\\"')
    number = draw(st.integers(-(1 << 70), 1 << 70).map(str) | huge_numbers)
    depth = draw(st.integers(0, 50))
    text = TEMPLATE.format(regex=regex, number=number, nested="[" * depth + "]" * depth)
    if how == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    return text


@settings(max_examples=300, deadline=None)
@given(text=config_texts())
def test_config_file_gives_a_config_and_errors_never_an_exception(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.toml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    config, errors = load_file(path)
    assert isinstance(config, Config)
    for error in errors:
        assert isinstance(error, ConfigError) and error.key and error.reason


# -- the routing lists' regexes (routing/lists.py, downloaded from the internet) ------------------


@settings(max_examples=300, deadline=None)
@given(
    regex=regex_texts,
    line=st.sampled_from(["regexp:{}", "/{}/", "DOMAIN-REGEX,{},Proxy", "  - 'DOMAIN-REGEX,{}'"]),
    fmt=st.sampled_from([None, *ListFormat]),
)
def test_a_list_line_with_any_regex_is_an_error_not_a_crash(
    regex: str, line: str, fmt: ListFormat | None
) -> None:
    text = ("payload:\n" if line.startswith(" ") else "") + line.format(regex) + "\nexample.com\n"
    result = parse_list(text, fmt=fmt, file="fuzz")
    for error in result.errors:
        assert error.file == "fuzz"
    RuleSet(result.rules).match("example.com", 443)


# -- the wstunnel JWT's JSON (wire/wstunnel.py) ---------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


json_documents = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


@st.composite
def jwt_payloads(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["json", "claims", "nested", "digits"]))
    if how == "nested":
        depth = draw(st.integers(1, 5000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return (opener * depth + "1" + closer * depth).encode()
    if how == "digits":
        digits: str = draw(huge_numbers)
        return ('{"id":"x","p":{"Tcp":{}},"r":"h","rp":' + digits + "}").encode()
    if how == "claims":
        claims = {"id": "x", "p": draw(json_documents), "r": "h", "rp": draw(json_documents)}
        return json.dumps(claims).encode()
    document: object = draw(json_documents)
    return json.dumps(document).encode()


HEADER = _b64(b'{"typ":"JWT","alg":"HS256"}')


@settings(max_examples=300, deadline=None)
@given(payload=jwt_payloads(), header=st.sampled_from([HEADER, "", "e30"]) | st.text(max_size=9))
def test_jwt_claims_decode_raises_only_value_errors(payload: bytes, header: str) -> None:
    try:
        Claims.decode(f"{header}.{_b64(payload)}.{_b64(b'signature')}")
    except (ValueError, RemoteProtocolError):
        pass
