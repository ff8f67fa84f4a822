"""msgpack with Isaac-GR00T's two numpy encodings, decoded strictly; ModalityConfig on the wire.

Isaac-GR00T's inference service (gr00t/eval/service.py for N1.5, gr00t/policy/server_client.py
for N1.6 / N1.7) sends msgpack maps whose numpy arrays are, depending on the release:

  NPY   (N1.5, and N1.6 / N1.7 up to the N1.7 release commit 23ace64)
        {"__ndarray_class__": True, "as_npy": <the bytes of np.save(array, allow_pickle=False)>}
  MNP   (Isaac-GR00T 626af89: msgpack_numpy's encoding, object arrays refused)
        {b"nd": True, b"type": "<f4", b"kind": b"", b"shape": [2, 3], b"data": <raw C-order bytes>}
        (numpy scalars: {b"nd": False, b"type": "<f4", b"data": <bytes>})

Both are decoded; `unpack` says which one a message used so the answer goes back in the same form.
Decoding never unpickles and never trusts a header: only bool / integer / float arrays (and
unicode text arrays, for instructions) of at most MAX_ARRAY_DIMS dimensions whose byte count
matches their shape are accepted; object, structured (void) and other kinds, ext types and npy
files of another kind are refused with a one-line reason. Arrays come back as read-only views of
the message's bytes.

ModalityConfig (get_modality_config) is encoded as the client's release decodes it: the N1.5
service's {"__ModalityConfig_class__": True, "as_json": "<JSON text>"}, or the N1.6 / N1.7 form
whose "as_json" is the dataclass as a map, under both markers that release used
("__ModalityConfig_class__" up to 23ace64, "__ModalityConfig__" at 626af89).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
import numpy as np
from numpy.lib import format as npy

from vla_inference.transport.strict_msgpack import DecodeError, unpackb

NPY: Literal["npy"] = "npy"
MNP: Literal["msgpack-numpy"] = "msgpack-numpy"
Form = Literal["npy", "msgpack-numpy"]
MAX_ARRAY_DIMS = 8
MAX_NPY_HEADER = 4096
# numpy type strings accepted: bool, integers, floats; unicode text (instructions).
_TYPE = re.compile(r"[<>|=]?(?:[biuf][1-9][0-9]?|U[0-9]{1,6})")
_KINDS = "biufU"


@dataclass(frozen=True)
class Message:
    """One decoded request: its content and the array encoding it used (None: it sent no array)."""

    content: Any
    form: Form | None


def _text(value: Any) -> Any:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _dtype(value: Any) -> np.dtype[Any]:
    text = _text(value)
    if not isinstance(text, str) or not _TYPE.fullmatch(text):
        raise DecodeError(f"array type {text!r} is refused: only bool, integer, float or text arrays")
    return np.dtype(text)


def _shape(value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list | tuple)
        or len(value) > MAX_ARRAY_DIMS
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)
    ):
        raise DecodeError(f"array shape {value!r} is not a list of at most {MAX_ARRAY_DIMS} sizes")
    return tuple(value)


def _array(data: bytes | memoryview, dtype: np.dtype[Any], shape: tuple[int, ...], fortran: bool) -> Any:
    """The array of exactly these bytes (a read-only view)."""
    count = math.prod(shape)  # exact (no int64 wrap-around for a forged shape)
    if count * dtype.itemsize != len(data):
        raise DecodeError(
            f"array of shape {shape} and type {dtype.str} needs {count * dtype.itemsize} bytes, "
            f"got {len(data)}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def decode_npy(blob: Any) -> Any:
    """np.save bytes -> array, reading the header itself (format 1.0 / 2.0): never unpickles, and a
    header claiming more data than the bytes hold is refused before anything is allocated."""
    if not isinstance(blob, bytes):
        raise DecodeError("as_npy must be the bytes of an .npy file")
    stream = io.BytesIO(blob)
    try:
        version = npy.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(stream, max_header_size=MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(stream, max_header_size=MAX_NPY_HEADER)
        else:
            raise DecodeError(f"npy format version {version} is not accepted (1.0 or 2.0)")
    except DecodeError:
        raise
    except (ValueError, TypeError, SyntaxError, OverflowError) as exc:
        reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise DecodeError(f"as_npy is not an .npy file ({reason})") from None
    if dtype.kind not in _KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise DecodeError(
            f"npy array of type {dtype.str} is refused (allow_pickle=False): "
            "only bool, integer, float or text arrays"
        )
    return _array(memoryview(blob)[stream.tell() :], dtype, _shape(shape), bool(fortran))


def _field(obj: Mapping[Any, Any], name: str) -> Any:
    """msgpack_numpy writes bin keys (b"nd"); other writers may use str keys."""
    return obj.get(name.encode(), obj.get(name))


def _decode_mnp(obj: Mapping[Any, Any]) -> Any:
    nd = _field(obj, "nd")
    kind = _text(_field(obj, "kind")) or ""
    if kind:  # "V" (structured) or "O" (pickled objects): msgpack_numpy's only other kinds
        raise DecodeError(f"msgpack-numpy array of kind {kind!r} is refused (never unpickled)")
    dtype = _dtype(_field(obj, "type"))
    data = _field(obj, "data")
    if not isinstance(data, bytes):
        raise DecodeError("msgpack-numpy array data must be bytes")
    if nd is True:
        return _array(data, dtype, _shape(_field(obj, "shape")), fortran=False)
    if nd is False:  # a numpy scalar
        return _array(data, dtype, (), fortran=False)[()]
    raise DecodeError(f"msgpack-numpy 'nd' must be true or false, got {nd!r}")


def unpack(data: bytes) -> Message:
    """Decode one request; DecodeError with a one-line reason for anything else."""
    forms: list[Form] = []

    def hook(obj: dict[Any, Any]) -> Any:
        if "__ndarray_class__" in obj:
            forms.append(NPY)
            return decode_npy(obj.get("as_npy"))
        if b"nd" in obj or "nd" in obj:
            forms.append(MNP)
            return _decode_mnp(obj)
        return obj

    content = unpackb(data, hook)
    return Message(content, forms[0] if forms else None)


def _encoder(form: Form) -> Any:
    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if not isinstance(obj, np.ndarray):
            raise TypeError(f"cannot pack {type(obj).__name__}")
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"cannot send an array of type {obj.dtype}")
        if form == NPY:
            out = io.BytesIO()
            np.save(out, obj, allow_pickle=False)
            return {"__ndarray_class__": True, "as_npy": out.getvalue()}
        array = np.ascontiguousarray(obj)
        return {
            b"nd": True,
            b"type": array.dtype.str,
            b"kind": b"",
            b"shape": array.shape,
            b"data": array.tobytes(),
        }

    return default


def pack(obj: Any, form: Form) -> bytes:
    """msgpack with numpy arrays in the given form (what the client's release decodes)."""
    return msgpack.packb(obj, default=_encoder(form), use_bin_type=True)


def modality_config(delta_indices: Sequence[int], keys: Sequence[str], legacy: bool) -> dict[str, Any]:
    """One ModalityConfig as the client's release decodes it (legacy: the N1.5 service)."""
    if legacy:  # pydantic ModalityConfig.model_dump_json(), read back with json.loads
        text = json.dumps({"delta_indices": list(delta_indices), "modality_keys": list(keys)})
        return {"__ModalityConfig_class__": True, "as_json": text}
    fields = {
        "delta_indices": list(delta_indices),
        "modality_keys": list(keys),
        "sin_cos_embedding_keys": None,
        "mean_std_embedding_keys": None,
        "action_configs": None,
    }
    return {"__ModalityConfig_class__": True, "__ModalityConfig__": True, "as_json": fields}
