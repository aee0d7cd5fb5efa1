"""The proxy terminal and what it stands on: pools, balancing, breakers, health checks."""
