"""A room's front door that imports its modules only when a name is first used (PEP 562): `server.api`
reads `CompileState` from `server.generation` without importing the runner, and with it diffusers' pipelines
and torch, so the CLI's client commands and `refinery --version` stay light. Type checkers read the room's
`if TYPE_CHECKING:` imports instead."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports `names` (public name -> "module:attribute", the
    module relative to `package`) on first use and keeps them in the package's namespace."""

    def __getattr__(name: str) -> Any:
        where = names.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = where.partition(":")
        value = getattr(importlib.import_module(f"{package}.{module}"), attribute)
        vars(importlib.import_module(package))[name] = value
        return value

    return __getattr__
