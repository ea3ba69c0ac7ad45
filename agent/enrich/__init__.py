"""Enrichers: pure functions and small caches that say where a destination is and who sent it."""
