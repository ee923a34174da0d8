"""The native upstream loop (llama-speculative-simple) built from the same llama.cpp sources.

The binary is built once from the sdist of the installed llama-cpp-python (the
sources the shim is built from) into $LLAMA_MTP_CACHE/native/<version>/.
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


def binary(quiet: bool = False) -> pathlib.Path:
    """Path of llama-speculative-simple, building it on first use (~5 min on 2 cores)."""
    builder = _loader.build_module()
    version = builder.find_installed().version
    root = builder.cache_root() / "native" / version
    exe = root / "build" / "bin" / TARGET
    if exe.is_file():
        return exe
    root.mkdir(parents=True, exist_ok=True)
    tree = _tree(version, root)
    if not quiet:
        print(f"bench: building {TARGET} from llama-cpp-python {version} sources (one-off, ~5 min)...",
              file=sys.stderr, flush=True)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "-S", str(tree), "-B", str(root / "build"), "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(root / "build"), "--target", TARGET, "-j", jobs], check=True,
                   capture_output=True)
    return exe


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
    print(binary())
