"""autovpn's own tunnel protocol: many streams over one WebSocket, client and server."""
