"""PAC files generated from the router's compiled rules, for the three modes.  Pure: text in,
text out.

* global: local addresses DIRECT, everything else ``PROXY 127.0.0.1:H; SOCKS5 127.0.0.1:S``
  (``; DIRECT`` appended only when the user allows fallback: a trailing DIRECT silently leaks
  traffic while the engine is down);
* smart: the router's decision order, in JavaScript, over the same compiled structures
  (``RuleSet``): object lookups per label suffix (no linear ``shExpMatch`` loop: 11 us vs 98 ms
  per host at 10k rules, measured in pacparser), the same keyword
  alternation, the same regexes, IP rules with integer math on IP-literal hosts only.  No
  ``dnsResolve``/``isInNet`` on names: a local DNS query for a proxied name is the leak this
  engine exists to avoid;
* direct: ``DIRECT``.

Local addresses (``router.LOCAL_NETWORKS``, plain names, ``*.local``, ``*.localhost``) are DIRECT
in every PAC file, the global one included, so a browser's router page never goes to the tunnel.
In smart mode the user's rules come first, exactly as in ``Router.decide``.

REJECT has no PAC spelling; a REJECT decision is sent to the engine's proxy, which rejects it.
GEOIP rules cannot be evaluated without a database and are left out of the PAC (the engine
still applies them).

Regex rules are RE2's syntax (``autovpn.routing.regex``); the PAC ships each one as a JavaScript
``RegExp`` only when ``js_regex`` can spell it so that it means the same in a browser: the
syntax both share (literals, ``.``, classes without POSIX names or a leading ``]``, ``\\d \\w \\s
\\b``, ``\\xHH``, escaped punctuation, groups, ``{n,m}`` repeats), with ``\\A``/``\\z`` written
``^``/``$`` and named groups as plain ones.  Anything else (flags such as ``(?i)``, ``\\pL``,
``[[:alpha:]]``, ``\\Q...\\E``, characters past U+FFFF) has no JavaScript spelling of the same
meaning; such a rule is named in a comment at the top of the PAC file and ``unportable_regexes``
lists it for the engine's start-up warning.  A DIRECT one is left out (a host it would match
goes to the engine or DIRECT, and the engine decides DIRECT again); a PROXY or REJECT one
becomes a match-all sending every host that reaches it to the engine, which applies the real
rule: a browser never goes DIRECT where the engine would not.

Every string from users or lists reaches the JavaScript through ``json.dumps`` (with
``ensure_ascii``), so nothing can break out of a literal or a comment.
"""

from __future__ import annotations

import ipaddress
import json
import re

from .router import LOCAL_NETWORKS, Action, Mode, Router
from .rules import Rule, RuleSet

__all__ = ["js_regex", "pac_answer", "proxy_string", "render_pac", "unportable_regexes"]

_CODE = {Action.DIRECT: 0, Action.PROXY: 1, Action.REJECT: 2}


def proxy_string(
    http_port: int,
    socks_port: int,
    *,
    host: str = "127.0.0.1",
    allow_direct_fallback: bool = False,
) -> str:
    """``PROXY h:H; SOCKS5 h:S``: PROXY first, since WinINet/WinHTTP clients know no SOCKS5;
    never bare ``SOCKS`` (browsers read it as SOCKS4 with local DNS)."""
    s = f"PROXY {host}:{http_port}; SOCKS5 {host}:{socks_port}"
    return s + "; DIRECT" if allow_direct_fallback else s


def pac_answer(action: Action, proxy: str) -> str:
    """What a PAC returns for a router action (REJECT goes to the engine, which rejects)."""
    return "DIRECT" if action is Action.DIRECT else proxy


def _js(value: object) -> str:
    """A JavaScript literal for ``value``: JSON with ASCII escapes (U+2028/2029 included), and
    ``</`` written ``<\\/`` so the text is also safe inside an HTML ``<script>``."""
    return json.dumps(value).replace("</", "<\\/")


def _v4_key(key: int, plen: int) -> str:
    # JS computes String(addr >>> (32 - plen)), and "0" for plen 0 (">>> 32" is a no-op in JS).
    return str(key) if plen else "0"


def _v6_key(key: int, plen: int) -> str:
    # JS has no 128-bit integers: it keys on the 32-digit hex form, whole nibbles as text, and a
    # last partial nibble as "/value".
    hexs = f"{key << (128 - plen):032x}"
    whole, rem = divmod(plen, 4)
    tail = f"/{int(hexs[whole], 16) >> (4 - rem)}" if rem else ""
    return hexs[:whole] + tail


# -- RE2 patterns as JavaScript -----------------------------------------------------------------

# Escapes both dialects read alike: Perl classes, control characters, punctuation (RE2 allows
# escaping any, JavaScript takes an identity escape for anything but a letter or digit).
_SHARED_ESCAPES = frozenset("dDwWsStnrfv") | frozenset(
    chr(c) for c in range(0x21, 0x7F) if not chr(c).isalnum()
)
_HEX2 = re.compile(r"[0-9a-fA-F]{2}")
_HEX_BRACES = re.compile(r"\{([0-9a-fA-F]{1,6})\}")
_REPEAT = re.compile(r"\{[0-9]+(?:,[0-9]*)?\}")
_NAMED_GROUP = re.compile(r"\?P?<[A-Za-z_][A-Za-z0-9_]*>")


def _js_escape(p: str, i: int, in_class: bool) -> tuple[str, int] | None:
    """The escape at ``p[i]`` (just past a backslash) in JavaScript, and the index after it."""
    c = p[i : i + 1]
    if c in _SHARED_ESCAPES and c:
        return "\\" + c, i + 1
    if c == "x":
        if _HEX2.match(p, i + 1):
            return "\\" + p[i : i + 3], i + 3
        m = _HEX_BRACES.match(p, i + 1)
        if m and int(m[1], 16) <= 0xFFFF:
            return f"\\u{int(m[1], 16):04x}", m.end()
        return None
    if not in_class and c in ("b", "B"):
        return "\\" + c, i + 1  # a word boundary: ASCII word characters in both
    if not in_class and c == "A":
        return "^", i + 1  # no multi-line flag can be set (flags are not translated)
    if not in_class and c == "z":
        return "$", i + 1
    return None  # \pN, \Q...\E, \C, octal, \a, \b in a class...


def _js_class(p: str, i: int) -> tuple[str, int] | None:
    """The class starting at ``p[i] == "["`` in JavaScript, and the index after it."""
    out = ["["]
    i += 1
    if p[i : i + 1] == "^":
        out.append("^")
        i += 1
    if p[i : i + 1] == "]":
        return None  # RE2: a literal "]"; JavaScript: an empty class, then "]"
    while i < len(p):
        c = p[i]
        if c == "]":
            out.append("]")
            return "".join(out), i + 1
        if c == "[":
            return None  # RE2's [:alpha:] names; a literal "[" is not worth telling apart
        if c == "\\":
            esc = _js_escape(p, i + 1, True)
            if esc is None:
                return None
            out.append(esc[0])
            i = esc[1]
            continue
        if not _one_unit(c):
            return None
        out.append(c)
        i += 1
    return None


def js_regex(pattern: str) -> str | None:
    """``pattern`` (RE2 syntax, already accepted by RE2) as a JavaScript ``RegExp`` source of
    the same meaning on host names, or None when the two dialects would differ."""
    out: list[str] = []
    i, n = 0, len(pattern)
    assertion = False  # the last atom was ^ $ \\b \\B: RE2 repeats one, JavaScript refuses to
    while i < n:
        c = pattern[i]
        if c in "*+?{" and assertion:
            return None
        assertion = False
        if c == "\\":
            esc = _js_escape(pattern, i + 1, False)
            if esc is None:
                return None
            out.append(esc[0])
            assertion = esc[0] in ("^", "$", "\\b", "\\B")
            i = esc[1]
        elif c == "[":
            cls = _js_class(pattern, i)
            if cls is None:
                return None
            out.append(cls[0])
            i = cls[1]
        elif c == "(":
            if pattern.startswith("(?:", i):
                out.append("(?:")
                i += 3
            elif pattern.startswith("(?", i):
                m = _NAMED_GROUP.match(pattern, i + 1)
                if m is None:
                    return None  # flags: (?i), (?s:...), (?U)...
                out.append("(")  # a name changes no match
                i = m.end()
            else:
                out.append("(")
                i += 1
        elif c == "{":
            m = _REPEAT.match(pattern, i)
            if m is None or any(len(d) > 4 for d in re.findall("[0-9]+", m[0])):
                # A literal "{" in RE2 (as is a count it cannot hold: {4294967296});
                # JavaScript's reading depends on its mode.
                return None
            out.append(m[0])
            i = m.end()
        elif c in "]}":
            out.append("\\" + c)  # literal in both; escaped, it cannot be misread
            i += 1
        elif not _one_unit(c):
            return None
        else:
            out.append(c)
            assertion = c in "^$"
            i += 1
    return "".join(out)


def _one_unit(c: str) -> bool:
    """Whether ``c`` is one character in RE2 (a code point of UTF-8) and one in JavaScript (a
    UTF-16 unit): past U+FFFF it is two units there, and a lone surrogate is none here."""
    o = ord(c)
    return o <= 0xFFFF and not 0xD800 <= o <= 0xDFFF


def unportable_regexes(router: Router) -> list[Rule]:
    """The regex rules ``js_regex`` cannot spell: the PAC leaves each out (DIRECT) or sends
    what reaches it to the engine (PROXY, REJECT).  The engine names them at start."""
    tiers = (router.user_rules, *router.list_tiers)
    return [rule for rs in tiers for p, rule in rs.regexes if js_regex(p.pattern) is None]


def _regexes_js(rs: RuleSet) -> list[list[object]]:
    out: list[list[object]] = []
    for p, rule in rs.regexes:
        js = js_regex(p.pattern)
        if js is not None:
            out.append([js, _CODE[rule.action]])
        elif rule.action is not Action.DIRECT:
            # What this rule matches cannot be told here: everything that reaches it goes to
            # the engine, which decides with the rule itself.
            out.append(["", _CODE[Action.PROXY]])
            break  # nothing after a match-all is reached
    return out


def _unportable_comment(router: Router) -> str:
    lines = [
        f"// regex {_js(rule.value)} ({_js(str(rule.source))}): no JavaScript equivalent; "
        + (
            "left out (the engine applies it)"
            if rule.action is Action.DIRECT
            else "hosts reaching it go to the engine"
        )
        for rule in unportable_regexes(router)
    ]
    return "".join(line + "\n" for line in lines)


def _tier_js(rs: RuleSet) -> str:
    obj: dict[str, object] = {
        "F": {k: _CODE[r.action] for k, r in rs.full.items()},
        "S": {k: _CODE[r.action] for k, r in rs.suffix.items()},
        "K": rs.keyword_re.pattern if rs.keyword_re is not None else "",
        "KA": {k: _CODE[r.action] for k, r in rs.keywords.items()},
        "R": _regexes_js(rs),
        "I4L": rs.ipv4_lengths,
        "I4": {
            str(plen): {_v4_key(k, plen): _CODE[r.action] for k, r in rs.ipv4[plen].items()}
            for plen in rs.ipv4_lengths
        },
        "I6L": rs.ipv6_lengths,
        "I6": {
            str(plen): {_v6_key(k, plen): _CODE[r.action] for k, r in rs.ipv6[plen].items()}
            for plen in rs.ipv6_lengths
        },
        "P": {str(p): _CODE[r.action] for p, r in rs.ports.items()},
        "PR": [[lo, hi, _CODE[r.action]] for lo, hi, r in rs.port_ranges],
    }
    # JSON.parse, not an object literal: a "__proto__" key stays an own property.
    return "prep(JSON.parse(" + _js(json.dumps(obj, separators=(",", ":"))) + "))"


def _local_js() -> str:
    v4: list[list[object]] = []
    v6: list[list[object]] = []
    for text, _ in LOCAL_NETWORKS:
        net = ipaddress.ip_network(text)
        key = int(net.network_address) >> (net.max_prefixlen - net.prefixlen)
        if net.version == 4:
            v4.append([net.prefixlen, _v4_key(key, net.prefixlen)])
        else:
            v6.append([net.prefixlen, _v6_key(key, net.prefixlen)])
    return f"var L4 = {_js(v4)};\nvar L6 = {_js(v6)};\n"


# Helpers shared by the three templates.  They mirror rules.normalize_host, rules.parse_ip
# (Python's ipaddress: no leading zeros in IPv4 octets, at most 4 hex digits per group, "::"
# standing for at least one group) and router.local_reason.
_JS_COMMON = r"""
function has(o, k) { return Object.prototype.hasOwnProperty.call(o, k); }
function norm(host) {
  var h = String(host).toLowerCase();
  if (h.charAt(0) == "[" && h.charAt(h.length - 1) == "]") h = h.substring(1, h.length - 1);
  h = h.replace(/\.+$/, "");
  if (h.indexOf(":") >= 0 && h.indexOf("%") >= 0) h = h.substring(0, h.indexOf("%"));
  return h;
}
function ip4(h) {
  var m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(h);
  if (!m) return -1;
  var n = 0;
  for (var i = 1; i <= 4; i++) {
    if (m[i].length > 1 && m[i].charAt(0) == "0") return -1;
    var b = parseInt(m[i], 10);
    if (b > 255) return -1;
    n = n * 256 + b;
  }
  return n;
}
function ip6(h) {
  if (h.indexOf(":") < 0 || !/^[0-9a-f:.]+$/.test(h)) return null;
  if (h.indexOf(".") >= 0) {
    var c = h.lastIndexOf(":");
    var v4 = ip4(h.substring(c + 1));
    if (v4 < 0) return null;
    h = h.substring(0, c + 1) + Math.floor(v4 / 65536).toString(16) + ":" +
        (v4 % 65536).toString(16);
  }
  var parts = h.split("::");
  if (parts.length > 2) return null;
  var head = parts[0] ? parts[0].split(":") : [];
  var tail = parts.length == 2 && parts[1] ? parts[1].split(":") : [];
  var n = head.length + tail.length;
  if (parts.length == 1 ? n != 8 : n > 7) return null;
  var g = head.slice(0);
  if (parts.length == 2) for (var k = 0; k < 8 - n; k++) g.push("0");
  g = g.concat(tail);
  var out = "";
  for (var j = 0; j < 8; j++) {
    if (!/^[0-9a-f]{1,4}$/.test(g[j])) return null;
    out += ("000" + g[j]).slice(-4);
  }
  return out;
}
function key4(v4, len) { return len ? String(v4 >>> (32 - len)) : "0"; }
function key6(hex, len) {
  var whole = len >> 2, rem = len & 3;
  var k = hex.substring(0, whole);
  if (rem) k += "/" + (parseInt(hex.charAt(whole), 16) >> (4 - rem));
  return k;
}
function isLocal(h, v4, v6) {
  var i;
  if (v4 >= 0) {
    for (i = 0; i < L4.length; i++) if (key4(v4, L4[i][0]) === L4[i][1]) return true;
    return false;
  }
  if (v6 !== null) {
    for (i = 0; i < L6.length; i++) if (key6(v6, L6[i][0]) === L6[i][1]) return true;
    return false;
  }
  if (h.indexOf(".") < 0) return true;
  var n = h.length;
  return h.substring(n - 6) == ".local" || h.substring(n - 10) == ".localhost";
}
"""

_JS_SMART = r"""
function re(p) { try { return new RegExp(p); } catch (e) { return null; } }
function prep(t) {
  t.K = t.K ? re(t.K) : null;
  for (var i = 0; i < t.R.length; i++) t.R[i][0] = re(t.R[i][0]);
  return t;
}
function urlPort(url) {
  var m = /^([a-z][a-z0-9+.\-]*):\/\/(?:[^\/?#@]*@)?(\[[^\]]*\]|[^\/?#:]*)(?::(\d+))?/i.exec(url);
  if (!m) return 0;
  if (m[3]) return parseInt(m[3], 10);
  var s = m[1].toLowerCase();
  return (s == "https" || s == "wss") ? 443 : (s == "ftp" ? 21 : 80);
}
function look(t, h, v4, v6, port) {
  var i, L, k;
  if (v4 >= 0) {
    for (i = 0; i < t.I4L.length; i++) {
      L = t.I4L[i]; k = key4(v4, L);
      if (has(t.I4[L], k)) return t.I4[L][k];
    }
  } else if (v6 !== null) {
    for (i = 0; i < t.I6L.length; i++) {
      L = t.I6L[i]; k = key6(v6, L);
      if (has(t.I6[L], k)) return t.I6[L][k];
    }
  } else {
    if (has(t.F, h)) return t.F[h];
    if (has(t.S, h)) return t.S[h];
    i = h.indexOf(".");
    while (i >= 0) {
      k = h.substring(i);
      if (has(t.S, k)) return t.S[k];
      k = h.substring(i + 1);
      if (has(t.S, k)) return t.S[k];
      i = h.indexOf(".", i + 1);
    }
    if (t.K) {
      var m = t.K.exec(h);
      if (m && has(t.KA, m[0])) return t.KA[m[0]];
    }
    for (i = 0; i < t.R.length; i++) if (t.R[i][0] && t.R[i][0].test(h)) return t.R[i][1];
  }
  k = String(port);
  if (has(t.P, k)) return t.P[k];
  for (i = 0; i < t.PR.length; i++) if (t.PR[i][0] <= port && port <= t.PR[i][1]) return t.PR[i][2];
  return -1;
}
function FindProxyForURL(url, host) {
  var h = norm(host), v4 = ip4(h), v6 = v4 < 0 ? ip6(h) : null, port = urlPort(url), c, i;
  c = look(USER, h, v4, v6, port);
  if (c >= 0) return ANSWER[c];
  if (isLocal(h, v4, v6)) return "DIRECT";
  for (i = 0; i < TIERS.length; i++) {
    c = look(TIERS[i], h, v4, v6, port);
    if (c >= 0) return ANSWER[c];
  }
  return ANSWER[DEFAULT];
}
"""

_JS_GLOBAL = r"""
function FindProxyForURL(url, host) {
  var h = norm(host), v4 = ip4(h), v6 = v4 < 0 ? ip6(h) : null;
  return isLocal(h, v4, v6) ? "DIRECT" : PROXY;
}
"""


def render_pac(
    router: Router,
    mode: Mode | None = None,
    *,
    http_port: int,
    socks_port: int,
    proxy_host: str = "127.0.0.1",
    allow_direct_fallback: bool = False,
) -> str:
    """The PAC file for ``mode`` (default: the router's current mode).  ``http_port`` and
    ``socks_port`` must be the ports the engine actually bound."""
    mode = mode or router.mode
    proxy = proxy_string(
        http_port, socks_port, host=proxy_host, allow_direct_fallback=allow_direct_fallback
    )
    header = f"// autovpn PAC, mode {mode.value}; generated, do not edit\n"
    if mode is Mode.DIRECT:
        return header + 'function FindProxyForURL(url, host) {\n  return "DIRECT";\n}\n'
    common = _local_js() + _JS_COMMON
    if mode is Mode.GLOBAL:
        return header + f"var PROXY = {_js(proxy)};\n" + common + _JS_GLOBAL
    answers = [pac_answer(a, proxy) for a in _CODE]
    tiers = ",\n".join(_tier_js(rs) for rs in router.list_tiers)
    return (
        header
        + _unportable_comment(router)
        + f"var ANSWER = {_js(answers)};\n"
        + f"var DEFAULT = {_CODE[router.default]};\n"
        + common
        + _JS_SMART
        + f"var USER = {_tier_js(router.user_rules)};\n"
        + f"var TIERS = [\n{tiers}\n];\n"
    )
