"""Writing a spec's GGUF: shared general/tokenizer metadata, the arch's hparams and tensors,
streamed tensor by tensor; ``q4_k_m`` goes through llama.cpp's own quantizer."""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from typing import Any

import numpy as np

from .archs import ArchLayout, get_arch
from .gguf_metadata import MetadataWriter
from .oracle import TestModelInfo, build_oracle, info_for
from .spec import FTYPES, GENERATOR_VERSION, TestModelSpec
from .vocab import Vocab, tokenizer_metadata

__all__ = ["write_test_model", "quantize"]


def _ggml_type(layout: ArchLayout, spec: TestModelSpec, name: str, shape: tuple[int, ...]) -> Any:
    from gguf import GGMLQuantizationType as Q

    if layout.keeps_f32(name, shape) or spec.ftype == "f32":
        return Q.F32
    if spec.ftype == "q8_0" and shape[-1] % 32 == 0:
        return Q.Q8_0
    return Q.F16  # f16, and the f16 source of q4_k_m


def _encode(data: np.ndarray, qtype: Any) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == Q.F16:
        return data.astype(np.float16)
    return quants.quantize(data, qtype)


def _nbytes(shape: tuple[int, ...], qtype: Any) -> tuple[tuple[int, ...], Any, int]:
    """(shape as passed to add_tensor_info, its numpy dtype, byte size)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    n = math.prod(shape)
    if qtype == Q.F32:
        return shape, np.float32, 4 * n
    if qtype == Q.F16:
        return shape, np.float16, 2 * n
    block, type_size = GGML_QUANT_SIZES[qtype]
    byte_shape = (*shape[:-1], shape[-1] // block * type_size)
    return byte_shape, np.uint8, n // block * type_size


def _add_common_metadata(w: Any, layout: ArchLayout, spec: TestModelSpec, vocab: Vocab) -> None:
    w.add_string("general.name", f"llama-mtp test model ({spec.arch}, {spec.recipe})")
    # q4_k_m: the f16 source; llama_model_quantize writes the final file_type
    w.add_uint32("general.file_type", FTYPES["f16" if spec.ftype == "q4_k_m" else spec.ftype])
    if spec.ftype == "q8_0":
        w.add_uint32("general.quantization_version", 2)
    layout.add_metadata(w, spec)
    for kv in tokenizer_metadata(vocab, layout, spec):
        w.add_key_value(*kv)

    # provenance, ignored by llama.cpp
    w.add_uint32("llama_mtp.generator_version", GENERATOR_VERSION)
    w.add_string("llama_mtp.spec", json.dumps(spec.recorded_fields(), sort_keys=True))


def _write_gguf(path: pathlib.Path, spec: TestModelSpec, layout: ArchLayout | None = None,
                extra_kv: dict[str, str] | None = None) -> TestModelInfo:
    """One GGUF of ``layout`` (default: the spec's arch; a second model of a pair, e.g. an
    external drafter, passes its own) for ``spec``'s oracle."""
    layout = get_arch(spec.arch) if layout is None else layout
    oracle = build_oracle(spec)
    shapes = layout.tensor_shapes(spec)
    qtypes = [_ggml_type(layout, spec, n, s) for n, s in shapes]

    w = MetadataWriter(path, layout.name)
    try:
        _add_common_metadata(w, layout, spec, oracle.vocab)
        for key, value in (extra_kv or {}).items():
            w.add_string(key, value)
        for (name, shape), qtype in zip(shapes, qtypes):
            info_shape, dtype, nbytes = _nbytes(shape, qtype)
            w.add_tensor_info(name, info_shape, np.dtype(dtype), nbytes, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for (name, shape), qtype in zip(shapes, qtypes):
            data = layout.tensor_data(spec, oracle, name, shape)
            assert data.shape == shape, (name, data.shape, shape)
            w.write_tensor_data(_encode(data, qtype))
    finally:
        w.close()
    return info_for(spec, oracle)


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], ftype: str = "q4_k_m",
             n_threads: int = 2) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (the code llama-quantize runs)."""
    import llama_cpp

    ftypes = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[ftype]
    params.nthread = n_threads
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {ftype}) failed with {rc}")


def write_test_model(path: str | os.PathLike[str], spec: TestModelSpec, layout: ArchLayout | None = None,
                     extra_kv: dict[str, str] | None = None) -> TestModelInfo:
    """Write the GGUF for ``spec`` to ``path`` and describe it (``layout``/``extra_kv``: see _write_gguf).

    ``ftype="q4_k_m"``: an f16 file is written next to ``path`` first, then quantized
    by llama.cpp (llama_model_quantize), which also picks per-tensor fallbacks (e.g.
    rows not a multiple of 256) exactly as it does for real models.
    """
    path = pathlib.Path(path)
    if spec.ftype != "q4_k_m":
        info = _write_gguf(path, spec, layout, extra_kv)
    else:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".f16.tmp")
        os.close(fd)
        try:
            info = _write_gguf(pathlib.Path(tmp), spec, layout, extra_kv)
            quantize(tmp, path, "q4_k_m")
        finally:
            os.unlink(tmp)
    info.path = path
    return info
