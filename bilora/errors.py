"""Errors the library raises for the user to fix (the pipeline shows them without a traceback)."""


class BaseModelError(ValueError):
    """The base model cannot be resolved or loaded; the message says what and how to fix it."""
