"""The on-disk cache of generated models (keyed by spec hash and GENERATOR_VERSION)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile
from typing import Any, Callable

from .archs import get_arch
from .gguf_writer import write_test_model
from .oracle import TestModelInfo, describe_test_model
from .spec import DEFAULT_ARCH, SIZES, TestModelSpec

__all__ = ["cache_dir", "cached_file", "cached_test_model", "cached_test_model_info", "resolve_spec"]


def cache_dir() -> pathlib.Path:
    """Where generated models live: ``$LLAMA_MTP_MODEL_CACHE`` (models only), else models/ under
    the llama_mtp cache root (``$LLAMA_MTP_CACHE``, as for shim builds, default ~/.cache/llama_mtp).

    The test suite sets LLAMA_MTP_MODEL_CACHE to a temporary folder; setting LLAMA_MTP_CACHE
    instead would also move the shim build cache (and so rebuild the shim).
    """
    models = os.environ.get("LLAMA_MTP_MODEL_CACHE")
    if models:
        return pathlib.Path(models)
    env = os.environ.get("LLAMA_MTP_CACHE")
    return (pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "llama_mtp") / "models"


def resolve_spec(spec: TestModelSpec | None, size: str, overrides: dict[str, Any]) -> TestModelSpec:
    """``spec`` + overrides, or the arch's ``size`` preset (SIZES[size] + ArchLayout.sizes) + overrides."""
    if overrides.get("vocab") is not None and "n_vocab" not in overrides:
        # a size preset's (or the replaced spec's) n_vocab is the synthetic vocab's: a real one sets its own
        overrides = {**overrides, "n_vocab": None}
    if spec is None:
        if size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
        layout = get_arch(overrides.get("arch", DEFAULT_ARCH))
        return TestModelSpec(**{**SIZES[size], **layout.sizes.get(size, {}), **overrides})
    return dataclasses.replace(spec, **overrides) if overrides else spec


def cached_test_model(
    spec: TestModelSpec | None = None, *, size: str = "tiny", **overrides: Any
) -> pathlib.Path:
    """Path of the GGUF for ``spec`` (or ``SIZES[size]`` + overrides), built on first use.

    Files live in ``cache_dir()`` (default ``~/.cache/llama_mtp/models``) under a
    name derived from the arch, spec hash and GENERATOR_VERSION; they are written to a
    temporary file and renamed, so concurrent builders never expose a partial file.
    """
    spec = resolve_spec(spec, size, overrides)
    vocab = f"-{spec.vocab}" if spec.vocab else ""  # synthetic: the names files have always had
    return cached_file(f"{spec.arch}{vocab}-mtp-{spec.recipe}-{spec.n_embd}x{spec.n_layer}-{spec.ftype}-{spec.key()}.gguf",
                       lambda tmp: write_test_model(tmp, spec))


def cached_file(name: str, write: Callable[[str], Any]) -> pathlib.Path:
    """``cache_dir() / name``, written by ``write(temporary path)`` on first use and renamed
    into place, so concurrent builders never expose a partial file."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if path.exists():
        return path
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def cached_test_model_info(
    spec: TestModelSpec | None = None, *, size: str = "tiny", **overrides: Any
) -> tuple[pathlib.Path, TestModelInfo]:
    """``cached_test_model`` plus the model's TestModelInfo."""
    spec = resolve_spec(spec, size, overrides)
    path = cached_test_model(spec)
    info = describe_test_model(spec)
    info.path = path
    return path, info
