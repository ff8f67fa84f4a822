"""TensorFlow's image resizing, as OpenVLA-OFT's evaluation uses it, in numpy (TensorFlow is never a
dependency). Pure functions on (H, W, 3) arrays.

OFT's evaluation (experiments/robot/openvla_utils.py, `prepare_images_for_vla`) does, per camera:

    if not 224 x 224:  JPEG round trip (tf.image.encode_jpeg: quality 95, 4:2:0; decode_image: fast IDCT)
                       -> tf.image.resize(224, method="lanczos3", antialias=True) -> round, clip, uint8
    then               uint8 -> float32 (x * (1/255)) -> tf.image.crop_and_resize to 224 of the centre box
                       with 90% of the area (side sqrt(0.9)), bilinear -> clip [0, 1]
                       -> uint8 as TF's convert_image_dtype(saturate=True): trunc(x * 255.5)

`lanczos3_resize` follows TF's ScaleAndTranslate kernel: per output pixel x the sample point
(x + 0.5) / scale; with antialias the kernel is stretched by max(1/scale, 1); taps on source pixels
whose centres lie within the stretched radius (3), clamped to the image, weights renormalised to sum to 1;
rows first (into a float32 intermediate), then columns, float32 sums in tap order. `crop_and_resize`
follows TF's CropAndResize: output row y samples y1 (H - 1) + y (y2 - y1) (H - 1) / (h - 1), bilinear
between floor and ceil, float32. Agreement with TensorFlow's own output: tests/fixtures/oft/README.md.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import simplejpeg
from PIL import Image

OFT_IMAGE_SIZE = 224  # OPENVLA_IMAGE_SIZE in OFT's evaluation
OFT_CROP_SCALE = 0.9  # area fraction of the centre crop
JPEG_QUALITY = 95  # tf.image.encode_jpeg's default
LANCZOS_RADIUS = 3.0
_PI = np.float32(3.14159265359)  # the constant TF's kernel uses


def jpeg_round_trip(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """(H, W, 3) uint8 -> JPEG -> (H, W, 3) uint8, as TF's encode_jpeg / decode_image defaults.

    Encoded by Pillow (libjpeg-turbo, baseline, quality 95, 4:2:0): the same bytes as TF's encoder on the
    fixture's images (simplejpeg's TurboJPEG encoder is not: up to 18 grey levels apart after decoding).
    Decoded by simplejpeg with the fast integer IDCT and fancy upsampling, TF's decode default (Pillow's
    decoder uses the accurate IDCT)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB").save(
        buffer, format="JPEG", quality=quality, subsampling=2
    )
    return simplejpeg.decode_jpeg(buffer.getvalue(), colorspace="RGB", fastdct=True, fastupsample=False)


def _lanczos3(x: np.ndarray) -> np.ndarray:
    """TF's LanczosKernelFunc(3) in float32: 1 near 0, 0 beyond the radius."""
    x = np.abs(x).astype(np.float32)
    r = np.float32(LANCZOS_RADIUS)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = r * np.sin(_PI * x) * np.sin(_PI * x / r) / (_PI * _PI * x * x)
    value = np.where(x <= np.float32(1e-3), np.float32(1.0), value)
    return np.where(x > r, np.float32(0.0), value).astype(np.float32)


@functools.lru_cache(maxsize=32)
def lanczos3_spans(in_size: int, out_size: int, antialias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """TF ScaleAndTranslate's spans for one axis: starts (out,) int64 and weights (out, span) float32
    (each row sums to 1 over its taps; taps past the image edge are zero). Cached per size: read-only."""
    scale = np.float32(out_size) / np.float32(in_size)
    inv_scale = np.float32(1.0 / float(scale))
    kernel_scale = max(inv_scale, np.float32(1.0)) if antialias else np.float32(1.0)
    radius = np.float32(LANCZOS_RADIUS) * kernel_scale
    span = min(2 * int(np.ceil(radius)) + 1, in_size)
    starts = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, span), np.float32)
    one_over = np.float32(1.0) / kernel_scale
    for x in range(out_size):
        sample = np.float32(np.float32(x) + np.float32(0.5)) * inv_scale
        if sample < 0 or sample > in_size:
            continue
        start = int(np.ceil(sample - radius - np.float32(0.5)))
        end = int(np.floor(sample + radius - np.float32(0.5)))
        start, end = min(max(start, 0), in_size - 1), min(max(end, 0), in_size - 1) + 1
        positions = np.arange(start, end, dtype=np.float32) + np.float32(0.5) - sample
        taps = _lanczos3(np.abs(positions * one_over))
        total = np.float32(0.0)
        for w in taps:  # sequential float32 sum, as the kernel accumulates
            total = np.float32(total + w)
        if abs(float(total)) >= 1000.0 * float(np.finfo(np.float32).tiny):
            weights[x, : end - start] = taps * (np.float32(1.0) / total)
        starts[x] = start
    return starts, weights


def _gather(image: np.ndarray, starts: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """Weighted sums along `axis` (0 rows, 1 columns) of (H, W, C) float32, tap by tap in float32."""
    size = image.shape[axis]
    out_shape = list(image.shape)
    out_shape[axis] = starts.shape[0]
    out = np.zeros(out_shape, np.float32)
    for tap in range(weights.shape[1]):
        index = np.minimum(starts + tap, size - 1)  # a tap past the edge has weight 0
        picked = np.take(image, index, axis=axis)
        w = weights[:, tap][:, None, None] if axis == 0 else weights[:, tap][None, :, None]
        out += w * picked
    return out


def lanczos3_resize(image: np.ndarray, height: int, width: int, antialias: bool = True) -> np.ndarray:
    """tf.image.resize(image, (height, width), method="lanczos3", antialias=antialias)
    -> float32 (height, width, C)."""
    pixels = np.asarray(image).astype(np.float32)
    row_starts, row_weights = lanczos3_spans(pixels.shape[0], height, antialias)
    col_starts, col_weights = lanczos3_spans(pixels.shape[1], width, antialias)
    rows = _gather(pixels, row_starts, row_weights, axis=0)  # (H', W, C)
    return _gather(rows, col_starts, col_weights, axis=1)  # (H', W', C)


def resize_for_policy(image: np.ndarray, size: int = OFT_IMAGE_SIZE) -> np.ndarray:
    """OFT's resize_image_for_policy: JPEG round trip, Lanczos-3 antialiased resize to (size, size),
    round half to even, clip, uint8."""
    decoded = jpeg_round_trip(image)
    resized = lanczos3_resize(decoded, size, size)
    return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def crop_and_resize(
    image: np.ndarray, box: tuple[float, float, float, float], height: int, width: int
) -> np.ndarray:
    """tf.image.crop_and_resize of one (H, W, C) float32 image and one normalised box (y1, x1, y2, x2),
    bilinear -> (height, width, C) float32 (samples outside the image are 0, TF's extrapolation value)."""
    pixels = np.asarray(image, np.float32)
    H, W = pixels.shape[:2]
    y1, x1, y2, x2 = (np.float32(v) for v in box)

    def samples(lo: np.float32, hi: np.float32, n_in: int, n_out: int) -> np.ndarray:
        if n_out > 1:
            step = np.float32(np.float32(hi - lo) * np.float32(n_in - 1)) / np.float32(n_out - 1)
            index = np.arange(n_out, dtype=np.float32)
            return (np.float32(lo * np.float32(n_in - 1)) + index * step).astype(np.float32)
        return np.full(1, np.float32(0.5) * (lo + hi) * np.float32(n_in - 1), np.float32)

    ys, xs = samples(y1, y2, H, height), samples(x1, x2, W, width)
    inside = ((ys >= 0) & (ys <= H - 1))[:, None] & ((xs >= 0) & (xs <= W - 1))[None, :]
    ys_c, xs_c = np.clip(ys, 0, H - 1), np.clip(xs, 0, W - 1)
    top, bottom = np.floor(ys_c).astype(np.int64), np.ceil(ys_c).astype(np.int64)
    left, right = np.floor(xs_c).astype(np.int64), np.ceil(xs_c).astype(np.int64)
    y_lerp = (ys_c - top.astype(np.float32))[:, None, None]
    x_lerp = (xs_c - left.astype(np.float32))[None, :, None]
    top_rows, bottom_rows = pixels[top], pixels[bottom]  # (height, W, C) each: one gather per row set
    top_left = np.take(top_rows, left, axis=1)
    upper = top_left + (np.take(top_rows, right, axis=1) - top_left) * x_lerp
    bottom_left = np.take(bottom_rows, left, axis=1)
    lower = bottom_left + (np.take(bottom_rows, right, axis=1) - bottom_left) * x_lerp
    out = upper + (lower - upper) * y_lerp
    if inside.all():  # the usual centre crop: nothing to extrapolate
        return out
    return np.where(inside[:, :, None], out, np.float32(0.0)).astype(np.float32)


def centre_crop_box(crop_scale: float = OFT_CROP_SCALE) -> tuple[float, float, float, float]:
    """The normalised (y1, x1, y2, x2) box of the centre crop with `crop_scale` of the area, in float32
    as OFT computes it (side sqrt(scale) clipped to [0, 1], offset (1 - side) / 2)."""
    side = np.clip(np.sqrt(np.float32(crop_scale)), np.float32(0), np.float32(1)).astype(np.float32)
    offset = np.float32((np.float32(1) - side) / np.float32(2))
    end = np.float32(offset + side)
    return float(offset), float(offset), float(end), float(end)


def centre_crop(
    image: np.ndarray, crop_scale: float = OFT_CROP_SCALE, size: int = OFT_IMAGE_SIZE
) -> np.ndarray:
    """OFT's center_crop_image on a (H, W, 3) uint8 image -> (size, size, 3) uint8."""
    pixels = np.asarray(image, np.uint8).astype(np.float32) * np.float32(1.0 / 255.0)
    cropped = np.clip(crop_and_resize(pixels, centre_crop_box(crop_scale), size, size), 0.0, 1.0)
    scaled = cropped * np.float32(255.5)
    return np.clip(scaled, 0, 255).astype(np.uint8)  # saturate_cast truncates


def oft_eval_image(image: np.ndarray, size: int = OFT_IMAGE_SIZE, crop: bool = True) -> np.ndarray:
    """prepare_images_for_vla on one camera: resize when not (size, size, 3), then the centre crop."""
    if image.shape != (size, size, 3):
        image = resize_for_policy(image, size)
    return centre_crop(image, size=size) if crop else np.asarray(image, np.uint8)
