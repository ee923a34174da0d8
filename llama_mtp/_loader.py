"""The one place that finds, builds and dlopens the native shim.

The shim is loaded by absolute path from a build directory keyed to the
installed llama-cpp-python (see build_ffi.py) and kept referenced for the life
of the process. Importing llama_mtp never touches it; the first use does.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import threading
from types import ModuleType
from typing import Any, Optional, Tuple

from .errors import ShimUnavailableError

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
# repo checkout (editable install) first, then the copy shipped inside the wheel
_BUILD_SCRIPT_CANDIDATES = (_PACKAGE_DIR.parent / "build_ffi.py", _PACKAGE_DIR / "_native" / "build_ffi.py")

_lock = threading.Lock()
_loaded: Optional[Tuple[Any, Any]] = None  # (ffi, lib), kept alive for the process


def build_module() -> ModuleType:
    """Import build_ffi.py (it is a script at the repo root, not part of the package API)."""
    mod = sys.modules.get("llama_mtp._build_ffi")
    if mod is not None:
        return mod
    for path in _BUILD_SCRIPT_CANDIDATES:
        if path.is_file():
            spec = importlib.util.spec_from_file_location("llama_mtp._build_ffi", path)
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            return mod
    raise ShimUnavailableError("llama_mtp is installed without its build script (build_ffi.py); reinstall it with pip")


def _import_ffi_module(path: pathlib.Path) -> Any:
    spec = importlib.util.spec_from_file_location("llama_mtp._cffi_abi", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ffi


def load() -> Tuple[Any, Any]:
    """Return (ffi, lib), building the shim first if this llama-cpp-python has none yet."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        builder = build_module()
        try:
            inst = builder.find_installed()
            out = builder.build_dir(inst)
            if not (out / builder.LIB_NAME).is_file():
                if os.environ.get("LLAMA_MTP_NO_AUTOBUILD"):
                    raise ShimUnavailableError(
                        f"the llama_mtp shim is not built for llama-cpp-python {inst.version}: "
                        "run `python -m llama_mtp build` (LLAMA_MTP_NO_AUTOBUILD is set)")
                out = builder.build()
        except builder.BuildError as e:
            raise ShimUnavailableError(f"cannot build the llama_mtp shim: {e}") from None
        ffi = _import_ffi_module(out / f"{builder.FFI_MODULE}.py")
        try:
            lib = ffi.dlopen(str((out / builder.LIB_NAME).resolve()))
        except OSError as e:
            raise ShimUnavailableError(
                f"cannot load {out / builder.LIB_NAME} ({e}); rebuild with `python -m llama_mtp build --force`") from None
        if lib.mtp_abi_version() != ffi.integer_const("MTP_ABI_VERSION"):
            raise ShimUnavailableError("the built shim's ABI version does not match mtp_cdef.h; "
                                       "rebuild with `python -m llama_mtp build --force`")
        _loaded = (ffi, lib)
        return _loaded


def last_error() -> str:
    """The shim's message for the calling thread's last failed call (mtp_last_error)."""
    ffi, lib = load()
    return ffi.string(lib.mtp_last_error()).decode("utf-8", "replace")


def is_loaded() -> bool:
    return _loaded is not None
