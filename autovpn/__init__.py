"""autovpn: a pure-Python asyncio proxy engine with a multiplexed wss tunnel and smart routing.

Embedding::

    import asyncio, autovpn

    async def main() -> None:
        config = autovpn.embedded_config(autovpn.state_dir())
        async with autovpn.Engine(config) as engine:
            ...  # SOCKS5 on 127.0.0.1:1080, HTTP on 127.0.0.1:8080
"""

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autovpn.config import ClientConfig, Config, ListenSpec, ServerConfig, load_file, state_dir
    from autovpn.engine import Engine, embedded_config
    from autovpn.errors import AutovpnError, ConfigError
    from autovpn.routing.router import Action, Mode

# Where each public name lives.  They are imported on first use (PEP 562), not here: ``python -m
# autovpn`` runs this file before the CLI, and ``autovpn --help`` or ``autovpn status`` must not
# pay for the engine, the tunnel and TLS (about 300 ms of imports) that they never use.
_HOMES = {
    "ClientConfig": "autovpn.config",
    "Config": "autovpn.config",
    "ListenSpec": "autovpn.config",
    "ServerConfig": "autovpn.config",
    "load_file": "autovpn.config",
    "state_dir": "autovpn.config",
    "Engine": "autovpn.engine",
    "embedded_config": "autovpn.engine",
    "AutovpnError": "autovpn.errors",
    "ConfigError": "autovpn.errors",
    "Action": "autovpn.routing.router",
    "Mode": "autovpn.routing.router",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'autovpn' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__all__ = [
    "Action",
    "AutovpnError",
    "ClientConfig",
    "Config",
    "ConfigError",
    "Engine",
    "ListenSpec",
    "Mode",
    "ServerConfig",
    "__version__",
    "embedded_config",
    "load_file",
    "state_dir",
]
