"""Old names kept for one release: each use warns with :class:`DeprecationWarning` and names the new one."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable


def warn_deprecated(old: str, new: str) -> None:
    """Warn that ``old`` is deprecated in favour of ``new`` (both as the user writes them)."""
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def deprecated_alias(old: str, new: Callable) -> Callable:
    """``new`` under its old name ``old`` (``module.name``): every call warns, then calls ``new``."""
    target = f"{new.__module__}.{new.__qualname__}"

    @functools.wraps(new)
    def alias(*args, **kwargs):
        warnings.warn(f"{old} is deprecated; use {target}", DeprecationWarning, stacklevel=2)
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old.rsplit(".", 1)[-1]
    alias.__doc__ = f"Deprecated alias of :func:`{target}` (kept for one release)."
    return alias
