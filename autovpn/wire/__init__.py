"""Sans-I/O codecs and state machines: bytes in, events and bytes out.

Nothing here imports asyncio, socket, ssl or any autovpn module above ``autovpn.errors``."""
