"""autovpn: a pure-Python asyncio proxy engine with a multiplexed wss tunnel and smart routing.

Embedding::

    import asyncio, autovpn

    async def main() -> None:
        config = autovpn.embedded_config(autovpn.state_dir())
        async with autovpn.Engine(config) as engine:
            ...  # SOCKS5 on 127.0.0.1:1080, HTTP on 127.0.0.1:8080
"""

__version__ = "0.1.0"

from autovpn.config import ClientConfig, Config, ListenSpec, ServerConfig, load_file, state_dir
from autovpn.engine import Engine, embedded_config
from autovpn.errors import AutovpnError, ConfigError
from autovpn.routing.router import Action, Mode

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
