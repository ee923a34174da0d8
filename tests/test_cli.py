"""python -m llama_mtp: one-line errors, generation with --compare, build."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from llama_mtp import _loader, testing


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama_mtp", *args], capture_output=True, text=True, timeout=600)


def test_generate_compare_on_a_model() -> None:
    path = str(testing.cached_test_model(testing.TestModelSpec(recipe="context", accept=0.8)))
    proc = run("generate", "-m", path, "-p", "Hello there", "--max-tokens", "24", "--n-draft", "2", "--compare",
               "--threads", "2", "--n-ctx", "256")
    assert proc.returncode == 0, proc.stderr
    assert "[mtp] 24 tokens" in proc.stdout
    assert "outputs match" in proc.stdout


def test_errors_are_one_line_without_traceback() -> None:
    proc = run("generate", "-m", "/nonexistent/model.gguf")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_build_prints_the_build_directory() -> None:
    proc = run("build")
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.strip().splitlines()
    assert printed, proc.stderr
    out = pathlib.Path(printed[-1])
    builder = _loader.build_module()
    assert out.is_absolute() and out.is_dir(), printed
    assert out == builder.build_dir()  # the build for the installed llama-cpp-python
    assert (out / "libllama_mtp.so").is_file() and builder.LIB_NAME == "libllama_mtp.so"
    assert (out / f"{builder.FFI_MODULE}.py").is_file()  # the cffi ABI-mode module
