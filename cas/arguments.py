"""Keyword arguments checked by name: a typo (``repo.load(snap, allow_pickel=True)``) is a typed
:class:`~cas.errors.ArgumentError` (a ``UsageError`` and a ``TypeError``) that names the arguments
the call takes, instead of a bare ``TypeError``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Container, Iterable
from typing import Any, TypeVar

from cas.errors import ArgumentError

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)


def checked_kwargs(fn: F, owner: str | None = None) -> F:
    """``fn`` with its keyword argument names checked before the call (one set lookup each)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn
    names = frozenset(n for n, p in params.items() if p.kind is not inspect.Parameter.POSITIONAL_ONLY)
    shown = [n for n in params if n not in ("self", "cls") and n in names]
    qual = f"{owner}.{fn.__name__}" if owner else fn.__name__

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_names(qual, kwargs, names, shown)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_names(qual: str, given: Iterable[str], names: Container[str], shown: list[str]) -> None:
    """An ArgumentError for the first of ``given`` not in ``names`` (the closest of ``shown`` as a hint)."""
    for name in given:
        if name not in names:
            close = difflib.get_close_matches(name, shown, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ArgumentError(
                f"{qual}() got an unexpected keyword argument {name!r}{hint} (it takes: {', '.join(shown)})"
            )


def check_public_kwargs(cls: C) -> C:
    """Wrap every public method (and ``__init__``) of ``cls`` with :func:`checked_kwargs`."""
    for name, value in list(vars(cls).items()):
        if name.startswith("_") and name != "__init__":
            continue
        if isinstance(value, (classmethod, staticmethod)):
            setattr(cls, name, type(value)(checked_kwargs(value.__func__, cls.__name__)))
        elif inspect.isfunction(value):
            setattr(cls, name, checked_kwargs(value, cls.__name__))
    return cls
