"""Hostile-load tests: the relay under runaway and hostile clients (issue 11)."""
