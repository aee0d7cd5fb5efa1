"""The response cache (RFC 9111, shared): `config.py` declares it, `filter.py` is the filter."""
