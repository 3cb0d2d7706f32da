"""Prefect flows: they schedule, retry and run the DVC stages; they never re-implement them."""

import polypflow  # noqa: F401  (turns telemetry off before Prefect is imported)
