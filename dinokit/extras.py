"""Optional dependencies: imported on use, with a message naming the extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the pip command."""


def require(module: str, package: str, extra: str) -> ModuleType:
    """``import module``, or raise ``MissingExtraError`` saying ``pip install 'dinokit[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"this needs the '{package}' package: pip install 'dinokit[{extra}]' "
                                f"(or pip install {package})") from None
