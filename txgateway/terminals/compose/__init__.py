"""Composed endpoints: `compose:` answers a route from several upstream calls merged into one JSON object."""
