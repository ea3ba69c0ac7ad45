"""Residency policy: jurisdiction groups, the policy language, and the engine that judges flows."""
