"""msgpack with openpi's numpy extension (openpi_client/msgpack_numpy.py), decoded strictly.

numpy arrays travel as maps with the bin keys __ndarray__, data, dtype, shape (np.generic as
__npgeneric__, data, dtype). Decoding is strict: no ext types, no object or structured dtypes,
sizes checked against the bytes, bounded nesting; nothing is ever unpickled.
"""

from __future__ import annotations

import re
from typing import Any

import msgpack
import numpy as np

from vla_inference.transport.strict_msgpack import DecodeError, refuse_ext, unpackb

MAX_ARRAY_DIMS = 8
MAX_NESTING = 16
CONTROL_KEY = "__ctrl__"
CONTROL_KINDS = ("episode_start", "episode_end")
_DTYPE = re.compile(r"[<>|=]?[biuf][1-9][0-9]?")


def _numpy_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic) and obj.dtype.kind not in "biuf":
        raise TypeError(f"cannot send dtype {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot pack {type(obj).__name__}")


def pack(obj: Any) -> bytes:
    """msgpack with numpy arrays and scalars as openpi-client encodes them."""
    return msgpack.packb(obj, default=_numpy_default, use_bin_type=True)


def _dtype(value: Any) -> np.dtype[Any]:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    if not isinstance(text, str) or not _DTYPE.fullmatch(text):
        raise DecodeError(f"array dtype {text!r} is not a bool, integer or float type")
    try:
        return np.dtype(text)
    except TypeError:
        raise DecodeError(f"array dtype {text!r} is not a numpy dtype") from None


def _numpy_hook(obj: dict[Any, Any]) -> Any:
    if b"__ndarray__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        shape = obj.get(b"shape")
        data = obj.get(b"data")
        if not isinstance(data, bytes):
            raise DecodeError("array data must be bytes")
        if (
            not isinstance(shape, list | tuple)
            or len(shape) > MAX_ARRAY_DIMS
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            raise DecodeError(f"array shape {shape!r} is not a list of at most {MAX_ARRAY_DIMS} sizes")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dtype.itemsize != len(data):
            raise DecodeError(
                f"array of shape {tuple(shape)} and dtype {dtype.str} needs {count * dtype.itemsize} "
                f"bytes, got {len(data)}"
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        value = obj.get(b"data")
        if not isinstance(value, bool | int | float):
            raise DecodeError("numpy scalar data must be a number")
        try:
            return dtype.type(value)
        except (OverflowError, ValueError):
            raise DecodeError(f"numpy scalar {value!r} does not fit {dtype.str}") from None
    return obj


def _depth(obj: Any, level: int = 0) -> int:
    if level > MAX_NESTING:
        raise DecodeError(f"the message nests deeper than {MAX_NESTING} levels")
    if isinstance(obj, dict):
        return max((_depth(v, level + 1) for v in obj.values()), default=level)
    if isinstance(obj, list):
        return max((_depth(v, level + 1) for v in obj), default=level)
    return level


def unpack(data: bytes) -> Any:
    """Decode one message; raises DecodeError with a short reason for anything else."""
    obj = unpackb(data, _numpy_hook)
    _depth(obj)
    return obj


def control_kind(data: bytes) -> str | None:
    """The kind of an openpi control message (a map with the key "__ctrl__"): "episode_start",
    "episode_end", or "ignored" for others; None for anything else. Reads the top-level keys only
    and skips their values, so an observation is not decoded here."""
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=True, ext_hook=refuse_ext, max_buffer_size=max(1, len(data))
    )
    unpacker.feed(data)
    try:
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == CONTROL_KEY:
                kind = unpacker.unpack()
                return kind if isinstance(kind, str) and kind in CONTROL_KINDS else "ignored"
            unpacker.skip()
    except (ValueError, TypeError, DecodeError, msgpack.UnpackException, RecursionError):
        return None  # not a map, or malformed: decoding it as an observation says why
    return None
