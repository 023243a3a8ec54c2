"""autovpn: a pure-Python asyncio proxy engine with a multiplexed wss tunnel and smart routing."""

__version__ = "0.1.0"
