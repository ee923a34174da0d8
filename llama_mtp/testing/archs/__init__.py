"""Registry of the architectures the generator can write.

``ARCHS`` maps a llama.cpp arch name (``general.architecture``) to an ArchLayout
instance.  To add an arch, write ``archs/<name>.py`` with a subclass of
``base.ArchLayout`` and add its module name to ``_MODULES`` below; each module calls
``register(...)`` at import.
"""

from __future__ import annotations

import importlib

from .base import ArchLayout

__all__ = ["ARCHS", "ArchLayout", "get_arch", "register"]

ARCHS: dict[str, ArchLayout] = {}

# one module per arch, imported in this order
_MODULES = ("qwen35", "step35", "qwen35moe", "qwen3next", "glm4moe", "deepseek2", "mimo2", "gemma4")


def register(layout: ArchLayout) -> ArchLayout:
    if layout.name in ARCHS:
        raise ValueError(f"arch {layout.name!r} registered twice")
    ARCHS[layout.name] = layout
    return layout


def get_arch(name: str) -> ArchLayout:
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {name!r}") from None


for _m in _MODULES:
    importlib.import_module(f"{__name__}.{_m}")
