"""Build the llama-mtp shim and its cffi module (out-of-line ABI mode).

The shim (shim/mtp_shim.cpp plus upstream's common/ speculative code) is compiled
against the llama.cpp that ships inside the *installed* llama-cpp-python and
linked to its libllama.so. ABI mode checks nothing at load time, so every build
lives in a directory keyed by the llama-cpp-python version and hashes of its
llama.h and libllama.so (and of our own sources): a stale build is never loaded.

Usage: ``python build_ffi.py`` or ``python -m llama_mtp build``.
Environment:
  LLAMA_MTP_LLAMA_CPP_SRC  llama.cpp checkout matching the installed library
                           (default: the llama-cpp-python sdist of the same
                           version, fetched once with pip and cached)
  LLAMA_MTP_CACHE          cache root (default ~/.cache/llama_mtp)
  LLAMA_MTP_SANITIZE       e.g. "address": build the shim with that sanitizer
  CXX                      C++ compiler (default c++ / g++)
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass

HERE = pathlib.Path(__file__).resolve().parent
CDEF_NAME = "mtp_cdef.h"
# the shim: the speculative surface, the chat surface, and the failure convention both use
SHIM_SOURCES = tuple(pathlib.Path("shim") / name for name in ("mtp_shim.cpp", "mtp_chat.cpp"))
SHIM_HEADERS = (pathlib.Path("shim") / "mtp_guard.h",)
FFI_MODULE = "_llama_mtp_cffi"
LIB_NAME = "libllama_mtp.so"
BUILD_FORMAT = 3  # bump when the build recipe changes
# llama-cpp-python versions the shim is tested against (pyproject.toml pins the same range)
TESTED_LLAMA_CPP_PYTHON = ("0.3.36",)

# upstream common/ files the MTP drafter and the chat surface need (checked to link with
# --no-undefined); plus every specialised chat parser in common/parsers/
COMMON_SOURCES = (
    "speculative", "sampling", "common", "log", "ngram-cache", "ngram-map", "ngram-mod",
    "fit", "json", "reasoning-budget", "unicode", "trie",
    "chat", "chat-auto-parser-generator", "chat-auto-parser-helpers", "chat-diff-analyzer", "chat-peg-parser",
    "peg-parser", "json-schema-to-grammar", "json-schema",
    "jinja/lexer", "jinja/parser", "jinja/runtime", "jinja/value", "jinja/string", "jinja/caps",
)
COMMON_GLOBS = ("parsers/*.cpp",)


class BuildError(RuntimeError):
    """The shim could not be built; the message says what to do."""


@dataclass(frozen=True)
class Installed:
    """The llama-cpp-python the shim must match."""

    version: str
    package_dir: pathlib.Path
    include_dir: pathlib.Path
    lib_dir: pathlib.Path

    @property
    def libllama(self) -> pathlib.Path:
        return self.lib_dir / "libllama.so"


def sources_root() -> pathlib.Path:
    """Where mtp_cdef.h and shim/ live: the repo root, or the installed copy."""
    for root in (HERE, HERE / "llama_mtp" / "_native"):
        if (root / CDEF_NAME).is_file() and all((root / src).is_file() for src in SHIM_SOURCES + SHIM_HEADERS):
            return root
    raise BuildError(f"shim sources not found next to {__file__} (expected {CDEF_NAME} and "
                     f"{', '.join(map(str, SHIM_SOURCES + SHIM_HEADERS))})")


def read_cdef() -> str:
    return (sources_root() / CDEF_NAME).read_text()


def make_ffibuilder():
    """The cffi builder: out-of-line ABI mode over mtp_cdef.h."""
    import cffi

    ffibuilder = cffi.FFI()
    ffibuilder.cdef(read_cdef())
    ffibuilder.set_source(FFI_MODULE, None)
    return ffibuilder


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("LLAMA_MTP_CACHE") or pathlib.Path.home() / ".cache" / "llama_mtp")


def find_installed() -> Installed:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("llama-cpp-python is not installed: pip install 'llama-cpp-python>=0.3.36'")
    package_dir = pathlib.Path(list(spec.submodule_search_locations)[0]).resolve()
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError as e:
        raise BuildError("llama-cpp-python is importable but has no distribution metadata; reinstall it with pip") from e
    include_dir = package_dir.parent / "include"
    lib_dir = package_dir / "lib"
    inst = Installed(version, package_dir, include_dir, lib_dir)
    if not (include_dir / "llama.h").is_file():
        raise BuildError(f"llama-cpp-python {version} installed no headers ({include_dir}/llama.h missing); reinstall it from source with pip")
    if not inst.libllama.is_file():
        raise BuildError(f"llama-cpp-python {version} has no {inst.libllama}; reinstall it")
    if "LLAMA_CONTEXT_TYPE_MTP" not in (include_dir / "llama.h").read_text(errors="replace"):
        raise BuildError(f"llama-cpp-python {version} predates MTP support (no LLAMA_CONTEXT_TYPE_MTP in llama.h); upgrade to >= 0.3.36")
    if b"llama_set_embeddings_nextn" not in inst.libllama.read_bytes():
        raise BuildError(f"{inst.libllama} does not export llama_set_embeddings_nextn: this llama-cpp-python has no MTP support")
    return inst


def _sha256(*paths: pathlib.Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def build_key(inst: Installed) -> str:
    """Identity of a build: the installed library plus our own sources and flags."""
    root = sources_root()
    parts = {
        "format": BUILD_FORMAT,
        "llama_cpp_python": inst.version,
        "llama_h": _sha256(inst.include_dir / "llama.h"),
        "libllama": _sha256(inst.libllama),
        "ours": _sha256(root / CDEF_NAME, *(root / src for src in SHIM_SOURCES + SHIM_HEADERS),
                        pathlib.Path(__file__).resolve()),
        "sanitize": os.environ.get("LLAMA_MTP_SANITIZE", ""),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    suffix = f"-{parts['sanitize']}" if parts["sanitize"] else ""
    return f"{inst.version}-{digest}{suffix}"


def build_dir(inst: Installed | None = None) -> pathlib.Path:
    inst = inst or find_installed()
    return cache_root() / "build" / build_key(inst)


def _find_compiler() -> str:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)  # type: ignore[return-value]
    raise BuildError("no C++ compiler found (set CXX, or install g++: apt-get install g++)")


# the parts of the sdist that are extracted (fnmatch patterns; "*" spans folders): the shim's
# sources, plus llama.cpp's vocab-only GGUFs and chat templates for llama_mtp.testing's models
SDIST_PARTS = tuple(f"vendor/llama.cpp/{part}" for part in (
    "common/*", "include/*", "src/*", "vendor/*", "examples/speculative-simple/*", "ggml/include/*",
    "models/ggml-vocab-*.gguf", "models/templates/*.jinja",
))
# written next to an extracted tree: the SDIST_PARTS it holds (a tree from an older list is extracted again)
_EXTRACTED_STAMP = ".llama_mtp-extracted.json"


def _fetch_sdist(version: str) -> pathlib.Path:
    """The llama.cpp tree inside the llama-cpp-python sdist of this version (cached)."""
    dest = cache_root() / "src" / f"llama-cpp-python-{version}"
    tree = dest / "vendor" / "llama.cpp"
    stamp = dest / _EXTRACTED_STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == list(SDIST_PARTS) and (tree / "include" / "llama.h").is_file():
        return tree
    print(f"llama_mtp: fetching llama-cpp-python {version} sources (one-off)...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        # --no-binary for this package only: build dependencies stay wheels
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
               f"llama-cpp-python=={version}", "-d", tmp, "-q"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(pathlib.Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise BuildError(f"could not fetch the llama-cpp-python {version} sdist ({last}); "
                             "set LLAMA_MTP_LLAMA_CPP_SRC to a llama.cpp checkout matching the installed library")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(dir=dest.parent))
        with tarfile.open(archives[0]) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name.split("/", 1)[1] if "/" in m.name else ""
                if m.isfile() and any(fnmatch.fnmatchcase(rel, part) for part in SDIST_PARTS):
                    m.name = rel
                    members.append(m)
            tar.extractall(staging, members=members, filter="data")
        (staging / _EXTRACTED_STAMP).write_text(json.dumps(list(SDIST_PARTS)))
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    return tree


def find_sources(inst: Installed) -> pathlib.Path:
    env = os.environ.get("LLAMA_MTP_LLAMA_CPP_SRC")
    tree = pathlib.Path(env).expanduser().resolve() if env else _fetch_sdist(inst.version)
    for need in ("include/llama.h", "common/speculative.cpp", "common/build-info.cpp.in"):
        if not (tree / need).is_file():
            raise BuildError(f"llama.cpp sources at {tree} lack {need}")
    if (tree / "include" / "llama.h").read_bytes() != (inst.include_dir / "llama.h").read_bytes():
        raise BuildError(f"llama.cpp sources at {tree} do not match the installed llama-cpp-python {inst.version} "
                         "(include/llama.h differs); point LLAMA_MTP_LLAMA_CPP_SRC at the matching checkout")
    return tree


class _CompileFailed(Exception):
    def __init__(self, src: pathlib.Path, stderr: str) -> None:
        super().__init__(src.name)
        self.src, self.stderr = src, stderr


def _compile(cxx: str, flags: list[str], src: pathlib.Path, obj: pathlib.Path) -> None:
    proc = subprocess.run([cxx, *flags, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise _CompileFailed(src, proc.stderr)


def _headers_digest(tree: pathlib.Path) -> str:
    """The upstream headers an upstream object depends on (part of its cache key)."""
    return _sha256(*sorted((tree / "common").rglob("*.h")), tree / "include" / "llama.h")


def _compile_upstream(cxx: str, flags: list[str], tree: pathlib.Path, headers: str, src: pathlib.Path,
                      obj: pathlib.Path) -> None:
    """Compile one upstream common/ file, reusing an object compiled before from the same file,
    tree headers (``headers``: their digest) and flags: a shim change then recompiles only the shim
    (upstream's chat and speculative code take minutes on 2 cores)."""
    key = hashlib.sha256(json.dumps([cxx, flags, str(src.relative_to(tree)), headers, _sha256(src)]).encode())
    cached = cache_root() / "objects" / f"{key.hexdigest()[:24]}.o"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        _compile(cxx, flags, src, tmp)
        tmp.replace(cached)  # atomic: a half-written object is never reused
    shutil.copyfile(cached, obj)


def _compile_error(inst: Installed, failed: _CompileFailed, log: pathlib.Path) -> BuildError:
    """One line: an untested llama-cpp-python is named as such; the compiler output goes to a log."""
    log.write_text(failed.stderr)
    if inst.version not in TESTED_LLAMA_CPP_PYTHON:
        return BuildError(f"the llama_mtp shim does not compile against llama-cpp-python {inst.version} "
                          f"(tested: {', '.join(TESTED_LLAMA_CPP_PYTHON)}); install a tested version, e.g. "
                          f"pip install 'llama-cpp-python=={TESTED_LLAMA_CPP_PYTHON[-1]}' (compiler output: {log})")
    return BuildError(f"compiling {failed.src.name} failed (compiler output: {log}): "
                      f"{(failed.stderr.strip().splitlines() or ['no output'])[0]}")


def build(force: bool = False, quiet: bool = False) -> pathlib.Path:
    """Compile the shim and the cffi module for the installed llama-cpp-python.

    Returns the build directory holding LIB_NAME and the FFI_MODULE module.
    """
    inst = find_installed()
    out = build_dir(inst)
    if not force and (out / LIB_NAME).is_file() and (out / f"{FFI_MODULE}.py").is_file():
        return out
    cxx = _find_compiler()
    tree = find_sources(inst)
    t0 = time.monotonic()
    if not quiet:
        print(f"llama_mtp: building the MTP shim for llama-cpp-python {inst.version} (one-off, ~3 min on 2 cores)...",
              file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        build_info = work / "build-info.cpp"
        build_info.write_text(
            (tree / "common" / "build-info.cpp.in").read_text()
            .replace("@LLAMA_BUILD_NUMBER@", "0")
            .replace("@LLAMA_BUILD_COMMIT@", f"llama-cpp-python-{inst.version}")
            .replace("@BUILD_COMPILER@", pathlib.Path(cxx).name)
            .replace("@BUILD_TARGET@", sys.platform)
        )
        sanitize = os.environ.get("LLAMA_MTP_SANITIZE", "")
        flags = ["-std=c++17", "-fPIC", "-O2", "-DNDEBUG", "-fvisibility=hidden",
                 f"-I{tree / 'common'}", f"-I{inst.include_dir}", f"-I{tree / 'vendor'}"]
        if sanitize:
            flags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]
        upstream = [tree / "common" / f"{name}.cpp" for name in COMMON_SOURCES]
        upstream += sorted(p for pattern in COMMON_GLOBS for p in (tree / "common").glob(pattern))
        ours = [build_info, *(sources_root() / src for src in SHIM_SOURCES)]
        objects = [work / f"{i:02d}-{src.stem}.o" for i, src in enumerate(upstream + ours)]
        headers = _headers_digest(tree)

        def compile_one(i: int) -> None:
            src, obj = (upstream + ours)[i], objects[i]
            if i < len(upstream):
                _compile_upstream(cxx, flags, tree, headers, src, obj)
            else:
                _compile(cxx, flags, src, obj)

        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                # the biggest files first: the pool's tail is then short ones
                list(pool.map(compile_one, sorted(range(len(objects)), key=lambda i: -(upstream + ours)[i].stat().st_size)))
        except _CompileFailed as failed:
            raise _compile_error(inst, failed, out.parent / f"{out.name}.compile-error.log") from None
        lib = work / LIB_NAME
        link = [cxx, "-shared", "-o", str(lib), *map(str, objects), f"-L{inst.lib_dir}",
                "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{inst.lib_dir}", "-Wl,--no-undefined"]
        if sanitize:
            link.insert(1, f"-fsanitize={sanitize}")
        proc = subprocess.run(link, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"linking the shim failed:\n{proc.stderr[-4000:]}")
        for obj in objects:
            obj.unlink()
        make_ffibuilder().emit_python_code(str(work / f"{FFI_MODULE}.py"))
        (work / "build.json").write_text(json.dumps({
            "llama_cpp_python": inst.version, "sources": str(tree), "compiler": cxx,
            "seconds": round(time.monotonic() - t0, 1), "sanitize": sanitize,
            "lib_bytes": lib.stat().st_size,
        }, indent=1))
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)  # atomic publish: a half-built directory is never loaded
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(f"llama_mtp: shim built in {time.monotonic() - t0:.0f} s -> {out}", file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":
    try:
        print(build(force="--force" in sys.argv))
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
