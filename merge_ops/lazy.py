"""A module imported on first attribute access.

Method modules hold their declaration (read by the API, which must not load torch) beside their
math (which needs torch). `torch = lazy("torch")` at the top of such a module lets the math read
like ordinary torch code while importing the module stays torch-free.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _Lazy(ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self._lazy_name = name
        self._lazy_module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_lazy_"):
            raise AttributeError(attr)
        if self._lazy_module is None:
            self._lazy_module = importlib.import_module(self._lazy_name)
        return getattr(self._lazy_module, attr)


def lazy(name: str) -> Any:
    """`name`, imported when an attribute is first read (then served from sys.modules)."""
    return _Lazy(name)
