"""The identify filter: JWT and API keys, JWKS, the auth: section."""
