"""Argument validation shared by every API: each raises MtpArgumentError naming the argument.

``bool`` is an ``int`` subclass in Python, so ``True`` would pass a bare isinstance check and
reach llama.cpp as 1: every integer check here refuses it explicitly.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import llama_cpp

from .errors import MtpArgumentError

NDraft = Union[int, str]  # a fixed draft length (0: plain decoding) or "auto"


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def integer(name: str, value: Any, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``value`` as an int in [lo, hi] (either bound optional)."""
    bounds = " and ".join(b for b in (f">= {lo}" if lo is not None else "",
                                      f"<= {hi}" if hi is not None else "") if b)
    if not is_int(value):
        raise MtpArgumentError(f"{name} must be an int{' ' + bounds if bounds else ''}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise MtpArgumentError(f"{name} must be an int {bounds}, got {value!r}")
    return value


def number(name: str, value: Any, lo: float = float("-inf"), hi: float = float("inf"), *,
           lo_open: bool = False) -> float:
    """``value`` as a float in [lo, hi] (``lo_open``: (lo, hi]); NaN is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MtpArgumentError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if v != v or (v <= lo if lo_open else v < lo) or v > hi:
        bound = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi != float("inf") else "")
        raise MtpArgumentError(f"{name} must be {bound}, got {value!r}")
    return v


def n_draft(value: Any, name: str = "n_draft") -> NDraft:
    """A draft length: an int >= 0 (0: plain decoding) or "auto"."""
    if value == "auto" and isinstance(value, str):
        return "auto"
    if not is_int(value) or value < 0:
        raise MtpArgumentError(f"{name} must be an int >= 0 or 'auto', got {value!r}")
    return value


def check_pair(target: Any, draft: Any) -> None:
    """A (target, draft) pair of Llama objects (what llama_mtp.load returns)."""
    if not isinstance(target, llama_cpp.Llama) or not isinstance(draft, llama_cpp.Llama):
        raise MtpArgumentError("the target and draft must be llama_cpp.Llama objects (see llama_mtp.load)")


def choice(name: str, value: Any, options: Iterable[str]) -> str:
    """One of ``options``."""
    options = tuple(options)
    if not isinstance(value, str) or value not in options:
        listed = " or ".join(repr(o) for o in options)
        raise MtpArgumentError(f"{name} must be {listed}, got {value!r}")
    return value
