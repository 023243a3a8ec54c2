"""Point the operating system's proxy setting at autovpn's PAC file, and put it back.

``--set-system-proxy`` (``system_proxy = true``): while the engine runs, the system's automatic
proxy configuration is the engine's ``/proxy.pac``; when it stops (Ctrl-C, SIGTERM, an error)
the setting that was there before comes back.  One setting per platform:

- GNOME (and what follows it: Chromium, Firefox's "use system proxy settings", GLib apps):
  ``org.gnome.system.proxy`` ``mode`` and ``autoconfig-url``, through ``gsettings``;
- macOS: each enabled network service's "Automatic Proxy Configuration", through
  ``networksetup`` (an administrator may be asked for);
- Windows: WinINet's ``AutoConfigURL`` for the user (what Edge, Chrome and most programs use),
  then WinINet is told that its settings changed.

The previous setting is also written to the state directory before anything is changed, so a
run that could not restore it (killed with SIGKILL, a power cut) is undone by the next one that
sets the system proxy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autovpn.errors import LocalError

log = logging.getLogger("autovpn.sysproxy")

#: In the state directory: the setting to put back, while it is not ours.
RECORD = "system-proxy.json"
GNOME_SCHEMA = "org.gnome.system.proxy"
_TIMEOUT = 15.0


class SystemProxyError(LocalError):
    """The system's proxy setting could not be read, changed or found."""


def _run(*args: str) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SystemProxyError(f"{args[0]} failed: {exc}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise SystemProxyError(
            f"{' '.join(args[:3])} failed: {detail[-1] if detail else done.returncode}"
        )
    return done.stdout


@dataclass(frozen=True, slots=True)
class Backend:
    """One platform's setting: read it (JSON-able), point it at a PAC URL, write it back."""

    name: str
    save: Callable[[], Any]
    point: Callable[[str], None]
    restore: Callable[[Any], None]


# -- GNOME ----------------------------------------------------------------------------------


def _gnome_save() -> dict[str, str]:
    # GVariant text ('none', 'http://...'): what `gsettings set` takes back as it is.
    return {
        key: _run("gsettings", "get", GNOME_SCHEMA, key).strip()
        for key in ("mode", "autoconfig-url")
    }


def _gnome_point(url: str) -> None:
    _run("gsettings", "set", GNOME_SCHEMA, "autoconfig-url", url)
    _run("gsettings", "set", GNOME_SCHEMA, "mode", "auto")


def _gnome_restore(saved: dict[str, str]) -> None:
    # The URL first: the mode that uses it must never point at the one going away.
    _run("gsettings", "set", GNOME_SCHEMA, "autoconfig-url", saved["autoconfig-url"])
    _run("gsettings", "set", GNOME_SCHEMA, "mode", saved["mode"])


def _gnome() -> Backend | None:
    if not sys.platform.startswith("linux") or shutil.which("gsettings") is None:
        return None
    try:
        _run("gsettings", "list-keys", GNOME_SCHEMA)
    except SystemProxyError:
        return None  # no schema: not a GNOME system (gsettings-desktop-schemas)
    return Backend("GNOME", _gnome_save, _gnome_point, _gnome_restore)


# -- macOS ----------------------------------------------------------------------------------


def _mac_services() -> list[str]:
    lines = _run("networksetup", "-listallnetworkservices").splitlines()[1:]
    return [line for line in lines if line and not line.startswith("*")]  # *: disabled


def _mac_save() -> dict[str, dict[str, str]]:
    saved = {}
    for service in _mac_services():
        fields = dict(
            line.split(": ", 1)
            for line in _run("networksetup", "-getautoproxyurl", service).splitlines()
            if ": " in line
        )
        saved[service] = {
            "url": fields.get("URL", "(null)"),
            "enabled": fields.get("Enabled", "No"),
        }
    return saved


def _mac_point(url: str) -> None:
    for service in _mac_services():
        _run("networksetup", "-setautoproxyurl", service, url)
        _run("networksetup", "-setautoproxystate", service, "on")


def _mac_restore(saved: dict[str, dict[str, str]]) -> None:
    for service, before in saved.items():
        if before["url"] not in ("(null)", ""):
            _run("networksetup", "-setautoproxyurl", service, before["url"])
        state = "on" if before["enabled"] == "Yes" else "off"
        _run("networksetup", "-setautoproxystate", service, state)


def _macos() -> Backend | None:
    if sys.platform != "darwin" or shutil.which("networksetup") is None:
        return None
    return Backend("macOS", _mac_save, _mac_point, _mac_restore)


# -- Windows --------------------------------------------------------------------------------

if sys.platform == "win32":
    import ctypes
    import winreg

    _INTERNET_SETTINGS = r"Software\Microsoft\Windows\CurrentVersion\Internet Settings"
    _INTERNET_OPTION_SETTINGS_CHANGED, _INTERNET_OPTION_REFRESH = 39, 37

    def _win_notify() -> None:
        # Running programs read WinINet's settings again only when told.
        wininet = ctypes.windll.wininet
        wininet.InternetSetOptionW(None, _INTERNET_OPTION_SETTINGS_CHANGED, None, 0)
        wininet.InternetSetOptionW(None, _INTERNET_OPTION_REFRESH, None, 0)

    def _win_save() -> str | None:
        with winreg.OpenKey(winreg.HKEY_CURRENT_USER, _INTERNET_SETTINGS) as key:
            try:
                value, _ = winreg.QueryValueEx(key, "AutoConfigURL")
            except FileNotFoundError:
                return None
        return str(value)

    def _win_set(url: str | None) -> None:
        access = winreg.KEY_SET_VALUE
        with winreg.OpenKey(winreg.HKEY_CURRENT_USER, _INTERNET_SETTINGS, 0, access) as key:
            if url is None:
                try:
                    winreg.DeleteValue(key, "AutoConfigURL")
                except FileNotFoundError:
                    pass
            else:
                winreg.SetValueEx(key, "AutoConfigURL", 0, winreg.REG_SZ, url)
        _win_notify()

    def _windows() -> Backend | None:
        return Backend("Windows", _win_save, _win_set, _win_set)

else:

    def _windows() -> Backend | None:
        return None


def backend() -> Backend:
    """This system's proxy setting, or SystemProxyError naming what is supported."""
    for find in (_gnome, _macos, _windows):
        found = find()
        if found is not None:
            return found
    raise SystemProxyError(
        "--set-system-proxy: no system proxy setting found here (supported: GNOME through"
        " gsettings with the org.gnome.system.proxy schema, macOS networksetup, Windows);"
        " point your browser at the PAC URL instead"
    )


@dataclass(slots=True)
class Applied:
    """The system proxy as this engine set it; ``restore`` puts the previous one back."""

    backend: Backend
    saved: Any
    record: Path
    pac_url: str
    restored: bool = False

    def restore(self) -> None:
        if self.restored:
            return
        self.backend.restore(self.saved)
        self.restored = True
        self.record.unlink(missing_ok=True)
        log.info("system proxy (%s): the previous setting is back", self.backend.name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a record of this process is from an earlier engine in it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, as another user's
    return True


def point_at(pac_url: str, state: Path) -> Applied:
    """Save the system's proxy setting (to ``state`` too), then point it at ``pac_url``.

    A record left by an engine that is gone means that engine never put its setting back:
    that (the original) is restored first.  One left by an engine still running is refused:
    two engines cannot both own the setting."""
    found = backend()
    record = state / RECORD
    leftover = _read(record)
    if leftover is not None:
        pid = int(leftover.get("pid", 0))
        if _alive(pid):
            raise SystemProxyError(
                f"--set-system-proxy: the autovpn engine with pid {pid} has set the system"
                " proxy; stop it first"
            )
        if leftover.get("backend") == found.name:
            found.restore(leftover["saved"])
            log.warning(
                "system proxy (%s): restored the setting that an autovpn engine (pid %d) could"
                " not restore when it stopped",
                found.name,
                pid,
            )
    saved = found.save()
    state.mkdir(parents=True, exist_ok=True)
    body = {"backend": found.name, "saved": saved, "pid": os.getpid(), "pac_url": pac_url}
    record.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    try:
        found.point(pac_url)
    except BaseException:
        found.restore(saved)  # whatever part of it was changed
        record.unlink(missing_ok=True)
        raise
    log.info(
        "system proxy (%s): now %s (the previous setting comes back on exit)", found.name, pac_url
    )
    return Applied(found, saved, record, pac_url)


def _read(record: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("system proxy record %s ignored: %s", record, exc)
        return None
    return data if isinstance(data, dict) and "saved" in data else None
