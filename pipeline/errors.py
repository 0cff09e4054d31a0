"""User errors: one clear message, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])

USER_ERROR_EXIT = 2


class UserError(Exception):
    """Bad input the user can fix (model path, target modules, ...). Message says what, where, how to fix."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types :func:`cli` reports as user errors. ``NonFiniteError`` counts only once
    ``bilora.methods.base`` is imported (nothing else raises it), so checking a params file never
    imports torch, peft or bitsandbytes."""
    from pipeline.config import ConfigError
    from pipeline.tasks import DataError

    errors: tuple[type[BaseException], ...] = (UserError, ConfigError, DataError)
    methods = sys.modules.get("bilora.methods.base")
    return errors + ((methods.NonFiniteError,) if methods is not None else ())


def cli(fn: F) -> F:
    """Wrap a stage entry point: user errors print one message and exit 2 without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.console import error

        try:
            return fn(*args, **kwargs)
        except user_errors() as e:
            error(str(e))
            sys.exit(USER_ERROR_EXIT)
        except KeyboardInterrupt:
            error("interrupted")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
