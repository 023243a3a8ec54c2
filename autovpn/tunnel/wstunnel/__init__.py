"""wstunnel v10's protocol: client, server (HTTP/1.1 and HTTP/2),
reverse tunnels, restrictions, CLI flags."""
