"""User errors: one clear message, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])

USER_ERROR_EXIT = 2


class UserError(Exception):
    """Bad input the user can fix (model path, target modules, ...). Message says what, where, how to fix."""


#: User-error classes defined elsewhere, as (module, class). Looked up in ``sys.modules`` rather than
#: imported: a module that was never loaded cannot have raised its error, and importing the ML stack
#: here would make every stage (and its DVC deps) depend on it.
_USER_ERROR_CLASSES = (
    ("pipeline.config.load", "ConfigError"),
    ("pipeline.data.readers", "DataError"),
    ("bilora.methods.method", "NonFiniteError"),
    ("bilora.layers", "KernelError"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    found = [getattr(sys.modules[m], name) for m, name in _USER_ERROR_CLASSES if m in sys.modules]
    return (UserError, *found)


def cli(fn: F) -> F:
    """Wrap a stage entry point: user errors print one message and exit 2 without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.terminal.console import error

        try:
            return fn(*args, **kwargs)
        except user_errors() as e:
            error(str(e))
            sys.exit(USER_ERROR_EXIT)
        except KeyboardInterrupt:
            error("interrupted")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
