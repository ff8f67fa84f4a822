"""Image decoding (JPEG, PNG, raw RGB) with a pixel cap, and resizing helpers.

The pixel cap is checked from the header before any pixel is decoded, so a decompression bomb
costs nothing. Decoding runs in the worker pool, never on the event loop.
"""

from __future__ import annotations

import io
import logging
import struct

import numpy as np
import simplejpeg
from PIL import Image

JPEG = "jpeg"
PNG = "png"
RAW_RGB = "raw_rgb"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
log = logging.getLogger(__name__)


class ImageError(ValueError):
    """The bytes are not a usable image; the message says why, for the robot engineer."""


def decode_image(
    data: bytes,
    encoding: str,
    *,
    width: int = 0,
    height: int = 0,
    max_pixels: int,
    at_least: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode to (H, W, 3) uint8 RGB, refusing images over max_pixels before decoding them.

    at_least = (width, height): the size the model's preprocessing will resize to. A JPEG at least
    twice that size is then decoded directly at 1/2, 1/4 or 1/8 scale (libjpeg-turbo's DCT
    scaling, an antialiased downscale), never below that size: about half the decode-and-resize
    time, pixels within about one grey level (mean) of a full decode, less than the JPEG's own
    quantisation error at quality 90. PNG and raw RGB are always decoded exactly.
    """
    if not data:
        raise ImageError("image is empty")
    if encoding == RAW_RGB:
        return _decode_raw(data, width, height, max_pixels)
    if encoding == JPEG:
        return _decode_jpeg(data, max_pixels, at_least)
    if encoding == PNG:
        return _decode_png(data, max_pixels)
    raise ImageError(f"unsupported encoding {encoding!r}")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {max_pixels} (VLA_MAX_IMAGE_PIXELS)"
        )


def _decode_raw(data: bytes, width: int, height: int, max_pixels: int) -> np.ndarray:
    if width <= 0 or height <= 0:
        raise ImageError("raw RGB images need their width and height")
    _check_pixels(width, height, max_pixels)
    expected = width * height * 3
    if len(data) != expected:
        raise ImageError(f"raw RGB {width}x{height} needs {expected} bytes, got {len(data)}")
    return np.frombuffer(data, np.uint8).reshape(height, width, 3)


# libjpeg-turbo's messages name its internal functions ("tjDecompressHeader3(): ..."): they go to the
# debug log; the client is told what it can act on.
NOT_A_JPEG = "not a decodable JPEG (send JPEG bytes, or set the encoding field to PNG or RAW_RGB)"


def _decode_jpeg(data: bytes, max_pixels: int, at_least: tuple[int, int] | None) -> np.ndarray:
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, RuntimeError) as exc:
        log.debug("JPEG header of %d bytes refused by libjpeg: %s", len(data), exc)
        raise ImageError(NOT_A_JPEG) from None
    _check_pixels(width, height, max_pixels)
    scaled: dict[str, int] = {}
    if at_least is not None and width >= 2 * at_least[0] and height >= 2 * at_least[1]:
        scaled = {"min_width": at_least[0], "min_height": at_least[1]}
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", **scaled)
    except (ValueError, RuntimeError) as exc:
        log.debug("JPEG of %dx%d (%d bytes) refused by libjpeg: %s", width, height, len(data), exc)
        raise ImageError(f"{NOT_A_JPEG}: its header says {width}x{height} but the data is corrupt") from None


def _decode_png(data: bytes, max_pixels: int) -> np.ndarray:
    # The IHDR chunk follows the signature: length(4) type(4) width(4) height(4).
    if len(data) < 24 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ImageError("not a valid PNG (bad signature or header)")
    width, height = struct.unpack(">II", data[16:24])
    _check_pixels(width, height, max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            image.load()
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"corrupt PNG ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes (used by the client and tests)."""
    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(image, dtype=np.uint8), quality=quality, colorspace="RGB"
    )


def resize_with_pad(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize keeping the aspect ratio, then pad with black to (height, width, 3) uint8.

    Matches the reference policies' behaviour: bilinear resize so the image fits, centred,
    zero padding on the short side. An image already of the target size is returned as is.
    """
    cur_h, cur_w = image.shape[:2]
    if (cur_w, cur_h) == (width, height):
        return image
    ratio = max(cur_w / width, cur_h / height)
    new_w, new_h = max(1, int(cur_w / ratio)), max(1, int(cur_h / ratio))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.BILINEAR))
    out = np.zeros((height, width, 3), np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Plain bilinear resize to (height, width, 3) without keeping the aspect ratio."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=Image.Resampling.BILINEAR))
