"""Secrets the agents never hold: stored encrypted, readable by root only, used by the proxy."""
