"""Prefect flows that run the stage functions of `tasks` as tasks."""
