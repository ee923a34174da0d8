"""GGUF metadata at vocabulary scale: reading and writing key/values fast enough for real
vocabularies (arrays of 150-500k strings).

``gguf.GGUFReader`` builds a numpy view per string: ~20 s for the 152k tokens and merges
of a Qwen vocabulary.  ``read_metadata`` walks the key/value section with ``struct`` (a
fraction of a second) and keeps every value as it is stored (strings as raw bytes, arrays
with their element type), so a value can be written back verbatim with
``GGUFWriter.add_key_value(*kv)``.  Only the metadata is read (no tensor infos).
``MetadataWriter`` is a GGUFWriter that packs such arrays in one go (gguf-py packs them
item by item: ~3 s for a Qwen vocabulary, ~8 s for Gemma 4's).
"""

from __future__ import annotations

import os
import struct
from typing import Any, NamedTuple

import gguf
import numpy as np
from gguf import GGUFValueType as V

__all__ = ["KeyValue", "MetadataWriter", "read_metadata"]

_MAGIC = b"GGUF"
# scalar value types: struct format (little-endian) of one value
_SCALARS = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
    V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d",
}


class KeyValue(NamedTuple):
    """One metadata entry, in the argument order of ``GGUFWriter.add_key_value``."""

    key: str
    value: Any                      # int / float / bool, bytes (STRING), or a list (ARRAY)
    type: V
    sub_type: V | None = None       # element type of an ARRAY


class _Cursor:
    def __init__(self, data: bytes, path: str) -> None:
        self.data, self.pos, self.path = data, 0, path

    def unpack(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.data, self.pos)
        except struct.error:
            raise ValueError(f"{self.path}: truncated GGUF metadata at byte {self.pos}") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> bytes:
        n = self.unpack("<Q")
        if self.pos + n > len(self.data):
            raise ValueError(f"{self.path}: truncated GGUF string at byte {self.pos}")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def strings(self, n: int) -> list[bytes]:
        # the hot loop of a vocabulary (n ~ 1e5..5e5): plain int/slice operations, no calls per item
        data, pos, out = self.data, self.pos, []
        for _ in range(n):
            size = int.from_bytes(data[pos:pos + 8], "little")
            out.append(data[pos + 8:pos + 8 + size])
            pos += 8 + size
        if pos > len(data):
            raise ValueError(f"{self.path}: truncated GGUF string array at byte {self.pos}")
        self.pos = pos
        return out

    def array(self, sub: V, n: int) -> list[Any]:
        if sub == V.STRING:
            return self.strings(n)
        if sub in _SCALARS and sub != V.BOOL:
            # one numpy read for numeric arrays (token types, scores); tolist() gives python
            # numbers that GGUFWriter packs with the same element type
            dtype = np.dtype(_SCALARS[sub])
            end = self.pos + n * dtype.itemsize
            if end > len(self.data):
                raise ValueError(f"{self.path}: truncated GGUF array at byte {self.pos}")
            values = np.frombuffer(self.data, dtype=dtype, count=n, offset=self.pos).tolist()
            self.pos = end
            return values
        return [self.value(sub) for _ in range(n)]

    def value(self, vtype: V) -> Any:
        if vtype == V.STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        raise ValueError(f"{self.path}: nested or unknown GGUF value type {vtype!r}")


def read_metadata(path: str | os.PathLike[str], prefix: str = "") -> list[KeyValue]:
    """The metadata entries of a little-endian GGUF (v2/v3) whose key starts with ``prefix``, in file order."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    cur = _Cursor(data, path)
    if data[:4] != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (big-endian or too old)")
    cur.unpack("<Q")  # tensor count: not needed
    out: list[KeyValue] = []
    for _ in range(cur.unpack("<Q")):
        key = cur.string().decode("utf-8")
        vtype = V(cur.unpack("<I"))
        if vtype == V.ARRAY:
            sub = V(cur.unpack("<I"))
            kv = KeyValue(key, cur.array(sub, cur.unpack("<Q")), vtype, sub)
        else:
            kv = KeyValue(key, cur.value(vtype), vtype)
        if key.startswith(prefix):
            out.append(kv)
    return out


class MetadataWriter(gguf.GGUFWriter):
    """A GGUFWriter whose string and numeric arrays (given their ``sub_type``) are packed in one go.

    The bytes are exactly gguf-py's: [type][element type][count] then the elements (a
    string: u64 length + bytes).  Only little-endian files take the fast path; should gguf-py
    rename ``_pack_val`` the override is simply not called and writing gets slower, not wrong.
    """

    def _pack_val(self, val: Any, vtype: V, add_vtype: bool, sub_type: V | None = None) -> bytes:
        fast = vtype == V.ARRAY and len(val) and self.endianess == gguf.GGUFEndian.LITTLE
        if fast and sub_type == V.STRING:
            items = [v.encode("utf-8") if isinstance(v, str) else v for v in val]
            body = b"".join(len(b).to_bytes(8, "little") + b for b in items)
        elif fast and sub_type in _SCALARS and sub_type != V.BOOL:
            body = np.asarray(val, dtype=np.dtype(_SCALARS[sub_type])).tobytes()
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = struct.pack("<I", vtype) if add_vtype else b""
        return head + struct.pack("<IQ", sub_type, len(val)) + body
