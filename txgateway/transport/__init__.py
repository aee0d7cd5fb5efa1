"""What carries requests in and out: HTTP/1.1, HTTP/2, WebSocket tunnels, TLS, listener endpoints."""
