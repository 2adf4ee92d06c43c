"""Safetensors files read by byte ranges through ``etils.epath``: a ``gs://`` model, no local copy.

``safetensors.safe_open`` memory-maps a local file. A file in cloud storage cannot be mapped, and
copying a 70B model (140 GB) to every host of a slice needs that much local disk per host. This
module opens the file as a stream instead, reads its header (an 8-byte little-endian length, then
JSON naming each tensor's dtype, shape and byte range) and answers the calls the loader makes of
a ``safe_open`` handle (``keys``, ``get_slice(name).get_shape()``, ``get_slice(name)[index]``)
with ranged reads.

A slice ``tensor[r0:r1, ...]`` occupies the rows ``r0:r1`` of the row-major tensor; those rows
are read in blocks of at most :data:`BLOCK_BYTES` and cut down to the slice on the host. So a
process reads exactly its part of a tensor split along its first axis, and every row of one
split along another axis (as a memory map of a local file would touch every page of it when a
row's share is smaller than a page); host memory holds the slice plus one block.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

# Largest read; also the most host memory a read holds beyond the slice it returns.
BLOCK_BYTES = 64 << 20
# Headers larger than this are refused, as safetensors itself does.
_MAX_HEADER = 100_000_000
_DTYPES = {
  "BOOL": np.bool_,
  "U8": np.uint8,
  "I8": np.int8,
  "I16": np.int16,
  "U16": np.uint16,
  "I32": np.int32,
  "U32": np.uint32,
  "I64": np.int64,
  "U64": np.uint64,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "F32": np.float32,
  "F64": np.float64,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
}


class _Slice:
  """One tensor of an open file: its shape, and reads of rectangular slices of it."""

  def __init__(self, file: SafetensorsFile, name: str):
    self._file = file
    self._dtype, self._shape, self._begin = file._tensors[name]

  def get_shape(self) -> list[int]:
    return list(self._shape)

  def __getitem__(self, index: tuple[slice, ...] | slice) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    index = index + (slice(None),) * (len(self._shape) - len(index))
    bounds = [s.indices(n) for s, n in zip(index, self._shape)]
    if any(step != 1 for _, _, step in bounds):
      raise ValueError("only contiguous slices are read")
    if not self._shape:
      return self._file._read_rows(self._dtype, (), self._begin, 0, 1).reshape(())
    (r0, r1, _), rest = bounds[0], tuple(slice(lo, hi) for lo, hi, _ in bounds[1:])
    out = np.empty([max(hi - lo, 0) for lo, hi, _ in bounds], self._dtype)
    row_shape = self._shape[1:]
    row_bytes = math.prod(row_shape) * np.dtype(self._dtype).itemsize
    per_block = max(1, BLOCK_BYTES // max(row_bytes, 1))
    for lo in range(r0, r1, per_block):
      hi = min(lo + per_block, r1)
      rows = self._file._read_rows(self._dtype, row_shape, self._begin, lo, hi)
      out[lo - r0 : hi - r0] = rows[(slice(None), *rest)]
    return out


class SafetensorsFile:
  """A safetensors file opened for ranged reads (local path or ``gs://`` URL).

  Use as a context manager, like ``safe_open``; it stands in for a ``safe_open(...,
  framework="numpy")`` handle in the loader.

  Args:
    path: the file.

  Raises:
    ValueError: the file is truncated or not a safetensors file (the message names it).

  Example:
    >>> import tempfile, numpy as np
    >>> from safetensors.numpy import save_file
    >>> path = tempfile.mkdtemp() + "/m.safetensors"
    >>> save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, path)
    >>> with SafetensorsFile(path) as f:
    ...   f.get_slice("w").get_shape(), f.get_slice("w")[1:3, 2:4].tolist()
    ([3, 4], [[6.0, 7.0], [10.0, 11.0]])
  """

  # A slice of columns costs its whole rows: the loader groups slices that share rows.
  reads_whole_rows = True

  def __init__(self, path: str | os.PathLike):
    self.path = epath.Path(path)
    self._stream = self.path.open("rb")
    try:
      self._tensors = self._read_header()
    except BaseException:
      self._stream.close()
      raise

  def _read_header(self) -> dict[str, tuple[Any, tuple[int, ...], int]]:
    size = self.path.stat().length
    head = self._stream.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < n <= min(_MAX_HEADER, size - 8):
      raise ValueError(f"{self.path} is truncated or not a safetensors file (header size {n})")
    try:
      header = json.loads(self._stream.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{self.path} is not a safetensors file (its header: {e})") from None
    if not isinstance(header, dict):
      raise ValueError(f"{self.path} is not a safetensors file (its header is not an object)")
    header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
      try:
        dtype = _DTYPES[entry["dtype"]]
        shape = tuple(int(x) for x in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{self.path}: tensor {name!r} has a malformed entry ({e!r})") from None
      if end - begin != math.prod(shape) * np.dtype(dtype).itemsize or begin < 0:
        raise ValueError(f"{self.path}: tensor {name!r} has offsets that do not fit its shape")
      if 8 + n + end > size:
        raise ValueError(
          f"{self.path} is truncated: tensor {name!r} ends at byte {8 + n + end} of {size}"
        )
      tensors[name] = (dtype, shape, 8 + n + begin)
    return tensors

  def _read_rows(self, dtype, row_shape: tuple[int, ...], begin: int, lo: int, hi: int):
    itemsize = np.dtype(dtype).itemsize
    row_bytes = math.prod(row_shape) * itemsize
    self._stream.seek(begin + lo * row_bytes)
    data = self._stream.read((hi - lo) * row_bytes)
    if len(data) != (hi - lo) * row_bytes:
      raise ValueError(
        f"{self.path} is truncated: a read of {(hi - lo) * row_bytes} bytes fell short"
      )
    return np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).reshape((hi - lo, *row_shape))

  def keys(self) -> list[str]:
    """The tensor names."""
    return list(self._tensors)

  def get_slice(self, name: str) -> _Slice:
    """The tensor ``name``, read only where it is indexed."""
    return _Slice(self, name)

  def close(self) -> None:
    self._stream.close()

  def __enter__(self) -> SafetensorsFile:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
