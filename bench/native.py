"""The native upstream binaries built from the same llama.cpp sources as the shim.

``binary()`` is the speculative loop (llama-speculative-simple, bench/run.py);
``server_binary()`` is llama.cpp's own server (llama-server, bench/serve.py).
Each is built once, on first use, from the sdist of the installed
llama-cpp-python into $LLAMA_MTP_CACHE/native/<version>/ (one CMake build tree,
so the second target reuses the libraries the first one compiled).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Dict, Optional

from llama_mtp import _loader

TARGET = "llama-speculative-simple"
SERVER_TARGET = "llama-server"


def _tree(version: str, root: pathlib.Path) -> pathlib.Path:
    tree = root / "src" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                        f"llama-cpp-python=={version}", "-d", tmp, "-q"], check=True)
        archive = next(pathlib.Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        staging = pathlib.Path(tempfile.mkdtemp(dir=root))
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        (root / "src").parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(next(staging.iterdir())), root / "src")
        shutil.rmtree(staging, ignore_errors=True)
    return tree


def _native_root() -> tuple:
    builder = _loader.build_module()
    version = builder.find_installed().version
    return version, builder.cache_root() / "native" / version


def built(target: str = TARGET) -> Optional[pathlib.Path]:
    """The target's binary if it has been built, else None (never builds)."""
    exe = _native_root()[1] / "build" / "bin" / target
    return exe if exe.is_file() else None


def _build(target: str, quiet: bool) -> pathlib.Path:
    version, root = _native_root()
    exe = root / "build" / "bin" / target
    if exe.is_file():
        return exe
    root.mkdir(parents=True, exist_ok=True)
    tree = _tree(version, root)
    if not quiet:
        print(f"bench: building {target} from llama-cpp-python {version} sources (one-off, ~5 min)...",
              file=sys.stderr, flush=True)
    jobs = str(os.cpu_count() or 2)
    # LLAMA_BUILD_SERVER defaults on for a top-level build; tools (server included) need it and LLAMA_BUILD_TOOLS
    subprocess.run(["cmake", "-S", str(tree), "-B", str(root / "build"), "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_SERVER=ON", "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(root / "build"), "--target", target, "-j", jobs], check=True,
                   capture_output=True)
    return exe


def binary(quiet: bool = False) -> pathlib.Path:
    """Path of llama-speculative-simple, building it on first use (~5 min on 2 cores)."""
    return _build(TARGET, quiet)


def server_binary(quiet: bool = False) -> pathlib.Path:
    """Path of llama-server, building it on first use (several minutes on 2 cores; less after binary())."""
    return _build(SERVER_TARGET, quiet)


_SPEED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s")
_ACCEPT = re.compile(r"n_accept\s*=\s*(\d+)")
_DRAFTED = re.compile(r"n_drafted\s*=\s*(\d+)")


def run(model: str, prompt: str, n_draft: int, n_predict: int, threads: int,
        no_repack: bool = False) -> Optional[Dict[str, float]]:
    """One native run: tokens/s of the decode phase and the acceptance it reports.

    ``no_repack``: ``-nr``, the native twin of ``use_extra_bufts=False``.
    """
    cmd = [str(binary(quiet=True)), "-m", model, "-p", prompt, "--spec-type", "draft-mtp",
           "--spec-draft-n-max", str(n_draft), "-n", str(n_predict), "-t", str(threads), "-tb", str(threads),
           "--temp", "0", "-c", "1024"] + (["-nr"] if no_repack else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    text = proc.stdout + proc.stderr
    m = _SPEED.search(text)
    if proc.returncode != 0 or m is None:
        return None
    acc, drafted = _ACCEPT.search(text), _DRAFTED.search(text)
    n_acc = int(acc.group(1)) if acc else 0
    n_dr = int(drafted.group(1)) if drafted else 0
    return {"tokens": int(m.group(1)), "seconds": float(m.group(2)), "tokens_per_second": float(m.group(3)),
            "acceptance": n_acc / n_dr if n_dr else 0.0}


if __name__ == "__main__":
    print(server_binary() if sys.argv[1:] == ["server"] else binary())
