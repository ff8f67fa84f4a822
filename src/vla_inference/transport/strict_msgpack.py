"""Strict msgpack decoding for the transports that speak msgpack (openpi/, groot_zmq/).

One way to read an untrusted msgpack message: str (or bin) map keys only, no ext types, every
failure a DecodeError with a one-line reason (never a library's traceback). Each transport's
codec passes the object hook that decodes its numpy encoding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack


class DecodeError(ValueError):
    """The bytes are not a message this server accepts; the text is the one-line reason."""


def refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack extension type {code} is not accepted")


def unpackb(data: bytes, object_hook: Callable[[dict[Any, Any]], Any]) -> Any:
    """Decode one message; DecodeError (the hook's own, or "not a msgpack message (...)")."""
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, object_hook=object_hook, ext_hook=refuse_ext
        )
    except DecodeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise DecodeError(f"not a msgpack message ({reason})") from None
