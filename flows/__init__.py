"""Prefect flows: they schedule, retry and run the DVC stages; they never re-implement them."""
