"""Import without a shim, build keying, and the loader's actionable errors."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from llama_mtp import _loader


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_import_never_loads_the_shim() -> None:
    proc = python("import llama_mtp, llama_mtp._loader as l; print(l.is_loaded())")
    assert proc.returncode == 0 and proc.stdout.strip() == "False"


def test_missing_shim_gives_an_actionable_message(tmp_path: pathlib.Path) -> None:
    code = ("import llama_mtp\n"
            "try:\n    llama_mtp._loader.load()\n"
            "except llama_mtp.ShimUnavailableError as e:\n    print('ERR', e)\n")
    proc = python(code, LLAMA_MTP_CACHE=str(tmp_path), LLAMA_MTP_NO_AUTOBUILD="1")
    assert proc.returncode == 0, proc.stderr
    assert "ERR" in proc.stdout and "python -m llama_mtp build" in proc.stdout


def test_build_is_keyed_to_the_installed_library() -> None:
    builder = _loader.build_module()
    inst = builder.find_installed()
    key = builder.build_key(inst)
    assert key.startswith(inst.version + "-")
    out = builder.build(quiet=True)
    assert out.name == key and (out / builder.LIB_NAME).is_file()
    ffi, lib = _loader.load()
    assert lib.mtp_abi_version() == ffi.integer_const("MTP_ABI_VERSION")
    assert "llama-cpp-python-" + inst.version in ffi.string(lib.mtp_build_info()).decode()


def test_mismatched_sources_are_refused(tmp_path: pathlib.Path) -> None:
    builder = _loader.build_module()
    inst = builder.find_installed()
    for rel in ("include/llama.h", "common/speculative.cpp", "common/build-info.cpp.in", "src/llama-cparams.h"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("// not the installed llama.cpp\n")
    os.environ["LLAMA_MTP_LLAMA_CPP_SRC"] = str(tmp_path)
    try:
        try:
            builder.find_sources(inst)
        except builder.BuildError as e:
            assert "do not match" in str(e)
        else:
            raise AssertionError("mismatched sources were accepted")
    finally:
        del os.environ["LLAMA_MTP_LLAMA_CPP_SRC"]
