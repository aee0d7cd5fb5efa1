"""The filters a route's chain is built from, each with its config beside it."""
