"""A minimal safetensors reader and writer in NumPy (no PyTorch, no ``safetensors`` package).

The format: an 8-byte little-endian header length ``L``, ``L`` bytes of UTF-8 JSON
``{"__metadata__": {str: str}, name: {"dtype": "BF16", "shape": [..], "data_offsets": [b, e]},
...}``, then the raw little-endian tensor bytes; ``data_offsets`` count from the end of the
header. :class:`SafetensorsFile` reads the header only and hands out read-only ``np.memmap``
views, one tensor at a time, so memory stays bounded by the tensors the caller keeps.
:class:`SafetensorsWriter` streams tensors to disk one at a time.

Every malformed input raises :class:`CheckpointError` naming the file, the tensor and what is
wrong: a header length past the end of the file, a corrupted JSON header, an unknown dtype, a
shape that does not match the byte span, overlapping spans, a truncated data section.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

__all__ = ["CheckpointError", "TensorInfo", "SafetensorsFile", "SafetensorsWriter", "save_file",
           "load_file", "DTYPES", "dtype_name"]

#: Safetensors dtype names -> NumPy dtypes (little-endian).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"), "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {dt: name for name, dt in DTYPES.items()}

#: Largest JSON header accepted (the reference implementation's limit).
MAX_HEADER_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint file or folder is malformed or unsupported.

    The message names the file (``path``), the tensor or entry (``key``) and what is wrong.
    """

    def __init__(self, message: str, *, path: Any = None, key: str | None = None):
        self.path = None if path is None else str(path)
        self.key = key
        where = []
        if path is not None:
            where.append(str(path))
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


def dtype_name(dtype: Any) -> str:
    """The safetensors name (``"BF16"``, ``"F32"``, ...) of a NumPy dtype."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    try:
        return _NAMES[dt]
    except KeyError:
        raise ValueError(f"safetensors has no dtype for {dt}") from None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: name, dtype, shape and absolute byte span."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def dtype_name(self) -> str:
        return _NAMES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _header_error(path, msg, key=None) -> CheckpointError:
    return CheckpointError(msg, path=path, key=key)


def _parse_header(path: Path, raw: bytes, data_start: int, file_size: int
                  ) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _header_error(path, f"corrupted safetensors header: the JSON blob does not parse "
                                  f"({e})") from None
    if not isinstance(header, dict):
        raise _header_error(path, f"corrupted safetensors header: expected a JSON object, got "
                                  f"{type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _header_error(path, "corrupted safetensors header: __metadata__ is not an object")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise _header_error(path, "corrupted safetensors header: a tensor entry needs dtype, "
                                      "shape and data_offsets", name)
        dt = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dt is None:
            raise _header_error(path, f"unsupported or unknown dtype {entry['dtype']!r}", name)
        shape, offsets = entry["shape"], entry["data_offsets"]
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)):
            raise _header_error(path, f"corrupted safetensors header: bad shape {shape!r}", name)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise _header_error(path, f"corrupted safetensors header: bad data_offsets "
                                      f"{offsets!r}", name)
        want = math.prod(shape) * dt.itemsize
        if offsets[1] - offsets[0] != want:
            raise _header_error(path, f"shape mismatch: {entry['dtype']}{shape} needs {want} bytes "
                                      f"but data_offsets {offsets} span {offsets[1] - offsets[0]}",
                                name)
        start, end = data_start + offsets[0], data_start + offsets[1]
        if end > file_size:
            raise _header_error(path, f"truncated file: the tensor's data ends at byte {end} but "
                                      f"the file has {file_size} bytes", name)
        tensors[name] = TensorInfo(name, dt, tuple(shape), start, end)
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, end0, name0), (start1, _, name1) in zip(spans, spans[1:]):
        if start1 < end0:
            raise _header_error(path, f"corrupted safetensors header: the data of {name0!r} and "
                                      f"{name1!r} overlap", name1)
    return {str(k): str(v) for k, v in metadata.items()}, tensors


class SafetensorsFile(Mapping[str, np.ndarray]):
    """Lazy read-only view of one safetensors file: ``f[name]`` maps one tensor from disk.

    Only the header is read on construction. ``f[name]`` (or :meth:`get`) returns a read-only
    ``np.memmap`` of that tensor (pages are read on access); ``f.info(name)`` gives dtype, shape
    and byte span without touching the data.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            file_size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise _header_error(self.path, f"truncated file: {len(head)} bytes, too short "
                                                   "for the 8-byte safetensors header length")
                n = int.from_bytes(head, "little")
                if n > MAX_HEADER_BYTES or 8 + n > file_size:
                    raise _header_error(self.path, f"truncated or not a safetensors file: the "
                                                   f"header length {n} runs past the end of the "
                                                   f"file ({file_size} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"cannot read: {e.strerror or e}", path=self.path) from None
        self.header_bytes = 8 + n
        self.metadata, self._tensors = _parse_header(self.path, raw, 8 + n, file_size)

    # Mapping interface -------------------------------------------------------------------
    def __getitem__(self, name: str) -> np.ndarray:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self)} tensors)"

    # ------------------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None

    def get(self, name: str, *, copy: bool = False) -> np.ndarray:
        """The tensor ``name``: a read-only memmap (``copy=True``: an in-memory array)."""
        t = self.info(name)
        if t.size == 0:
            return np.zeros(t.shape, t.dtype)
        arr = np.memmap(self.path, dtype=t.dtype, mode="r", offset=t.start,
                        shape=t.shape or (1,))
        if not t.shape:
            arr = arr.reshape(())
        return np.array(arr) if copy else arr

    def read_bytes(self, name: str) -> bytes:
        """The raw bytes of a (small) tensor."""
        t = self.info(name)
        with open(self.path, "rb") as f:
            f.seek(t.start)
            data = f.read(t.nbytes)
        if len(data) != t.nbytes:
            raise CheckpointError("truncated file while reading the tensor", path=self.path,
                                  key=name)
        return data

    @property
    def data_nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors.values())


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a file, copied into memory."""
    f = SafetensorsFile(path)
    return {name: f.get(name, copy=True) for name in f}


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, with memory bounded by one tensor.

    Tensors go to a scratch file beside ``path`` as they come (:meth:`add`); :meth:`close`
    writes the header, appends the scratch data in chunks and removes the scratch file. Use as a
    context manager: on an exception nothing is left at ``path`` and the scratch file is gone.
    """

    def __init__(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        fd, scratch = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".data",
                                       dir=self.path.parent)
        self._scratch = Path(scratch)
        self._data = os.fdopen(fd, "wb")
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0
        self.closed = False

    def add(self, name: str, array: Any) -> None:
        if name in self._entries or name == "__metadata__":
            raise ValueError(f"{self.path}: tensor name {name!r} given twice or reserved")
        arr = np.asarray(array)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        dt = dtype_name(arr.dtype)
        shape = [int(d) for d in arr.shape]
        arr = np.ascontiguousarray(arr)  # (0-d arrays come back 1-d)
        nbytes = arr.size * arr.dtype.itemsize
        if nbytes:
            self._data.write(arr.reshape(-1).view(np.uint8).data)
        self._entries[name] = {"dtype": dt, "shape": shape,
                               "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def close(self) -> None:
        """Writes the file (header, then the data)."""
        if self.closed:
            return
        self._data.close()
        header: dict[str, Any] = {}
        if self.metadata:
            header["__metadata__"] = self.metadata
        header.update(self._entries)
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        try:
            with open(self.path, "wb") as out, open(self._scratch, "rb") as data:
                out.write(len(raw).to_bytes(8, "little"))
                out.write(raw)
                shutil.copyfileobj(data, out, 16 << 20)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        finally:
            self._scratch.unlink(missing_ok=True)
        self.closed = True

    def abort(self) -> None:
        """Drops everything written so far."""
        if not self.closed:
            self._data.close()
            self._scratch.unlink(missing_ok=True)
            self.closed = True

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_file(tensors: Mapping[str, Any], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``tensors`` (name -> array, in order) to a safetensors file."""
    with SafetensorsWriter(path, metadata) as w:
        for name, arr in tensors.items():
            w.add(name, arr)
