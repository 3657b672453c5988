"""Prefect flows: orchestration only. Algorithm code lives in ``stages/``."""
