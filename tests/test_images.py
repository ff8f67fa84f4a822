"""Image decoding: the scaled JPEG decode for frames far larger than the model's input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vla_inference.preprocessing.images import JPEG, PNG, decode_image, encode_jpeg, resize_with_pad

LIMIT = 4096 * 4096


def _scene(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 255 // width), (y * 255 // height), ((x + y) % 64) * 4], axis=-1).astype(np.uint8)


@pytest.mark.parametrize(
    ("shape", "at_least", "decoded"),
    [
        ((224, 224), (96, 96), (112, 112)),  # 1/2: still >= 96
        ((480, 640), (96, 96), (120, 160)),  # 1/4
        ((224, 224), (120, 120), (224, 224)),  # less than twice the target: full decode
        ((480, 640), (224, 224), (240, 320)),  # 1/2 keeps both sides >= 224
        ((224, 224), None, (224, 224)),  # no target: full decode
    ],
)
def test_large_jpegs_decode_at_a_reduced_scale(shape, at_least, decoded) -> None:  # type: ignore[no-untyped-def]
    data = encode_jpeg(_scene(*shape))
    image = decode_image(data, JPEG, max_pixels=LIMIT, at_least=at_least)
    assert image.shape == (*decoded, 3) and image.dtype == np.uint8


def test_scaled_decode_stays_close_to_a_full_decode() -> None:
    data = encode_jpeg(_scene(480, 640))
    full = resize_with_pad(decode_image(data, JPEG, max_pixels=LIMIT), 96, 96)
    scaled = resize_with_pad(decode_image(data, JPEG, max_pixels=LIMIT, at_least=(96, 96)), 96, 96)
    difference = np.abs(full.astype(int) - scaled.astype(int))
    assert difference.mean() < 2.0 and 0 < difference.max() < 64


def test_png_is_always_decoded_exactly() -> None:
    scene = _scene(240, 320)
    buffer = io.BytesIO()
    Image.fromarray(scene).save(buffer, format="PNG")
    np.testing.assert_array_equal(
        decode_image(buffer.getvalue(), PNG, max_pixels=LIMIT, at_least=(96, 96)), scene
    )
