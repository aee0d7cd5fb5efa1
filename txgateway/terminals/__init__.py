"""Terminals other than the proxy (a route's answerer)."""
