"""Prefect flows that drive the rcat DVC pipeline (DVC decides what is stale; the flows compute nothing)."""
