"""Errors of the models package that a command reports without importing torch."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what was expected."""
