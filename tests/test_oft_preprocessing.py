"""TensorFlow's resizing as OpenVLA-OFT's evaluation uses it, in numpy (preprocessing/tf_resize.py).

Hand-computed values (the Lanczos-3 kernel, identity and constant images, a 2 x 2 bilinear crop, the
centre-crop box, TF's float -> uint8 truncation), then TensorFlow 2.21's own output recorded once
(tests/fixtures/oft/README.md): JPEG round trip, crop_and_resize and upstream's whole evaluation
pipeline bit-exact, Lanczos-3 within 2e-4 grey levels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.oft_checkpoints import pattern_image
from vla_inference.preprocessing import tf_resize as T

FIXTURE = Path(__file__).parent / "fixtures" / "oft" / "tf_reference.npz"


@pytest.fixture(scope="module")
def tf_out() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return dict(data)


def test_lanczos3_kernel_values() -> None:
    x = np.array([0.0, 0.5, 1.0, 1.5, 2.999, 3.0, 3.5], np.float32)
    expected = [1.0, 3 * math.sin(math.pi / 2) * math.sin(math.pi / 6) / (math.pi**2 / 4), 0.0]
    expected += [3 * math.sin(1.5 * math.pi) * math.sin(0.5 * math.pi) / (math.pi**2 * 2.25)]
    got = T._lanczos3(x)
    np.testing.assert_allclose(got[:4], expected, atol=1e-6)  # 1, 0.6079, 0, -0.1351
    assert abs(got[4]) < 1e-3 and abs(got[5]) < 1e-6  # ~0 at the radius (TF zeroes only beyond it)
    assert got[6] == 0


def test_lanczos3_spans_sum_to_one_and_stretch_when_downscaling() -> None:
    starts, weights = T.lanczos3_spans(256, 224)
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-6)
    assert weights.shape == (224, 2 * math.ceil(3 * 256 / 224) + 1)  # antialias: radius 3 * 256/224
    assert starts[0] == 0 and starts[-1] + weights.shape[1] >= 255
    _, up = T.lanczos3_spans(100, 224)
    assert up.shape[1] == 7  # upscaling: the kernel is not stretched


def test_lanczos3_identity_and_constant() -> None:
    image = pattern_image(20, 30, 1)
    # the kernel is ~0 (sin(k pi) in float32), not exactly 0, at the other integer offsets, as in TF
    np.testing.assert_allclose(T.lanczos3_resize(image, 20, 30), image.astype(np.float32), rtol=0, atol=1e-4)
    flat = np.full((50, 70, 3), 77, np.uint8)
    np.testing.assert_allclose(T.lanczos3_resize(flat, 23, 31), 77.0, atol=1e-4)


def test_crop_and_resize_bilinear_by_hand() -> None:
    image = np.array([[0.0, 2.0], [4.0, 6.0]], np.float32)[:, :, None]
    got = T.crop_and_resize(image, (0.0, 0.0, 1.0, 1.0), 3, 3)[:, :, 0]
    np.testing.assert_allclose(got, [[0, 1, 2], [2, 3, 4], [4, 5, 6]], atol=1e-6)
    # rows sample y = 0.25 and 0.75; a one-column crop samples the box's centre x = 0.5 (TF's rule)
    half = T.crop_and_resize(image, (0.25, 0.0, 0.75, 1.0), 2, 1)[:, 0, 0]
    np.testing.assert_allclose(half, [1 + (5 - 1) * 0.25, 1 + (5 - 1) * 0.75], atol=1e-6)
    outside = T.crop_and_resize(image, (-1.0, 0.0, 0.0, 1.0), 2, 2)[:, :, 0]
    np.testing.assert_allclose(outside, [[0, 0], [0, 2]], atol=1e-6)  # the row at y = -1 is TF's 0


def test_centre_crop_box_and_uint8_truncation() -> None:
    y1, x1, y2, x2 = T.centre_crop_box(0.9)
    side = math.sqrt(0.9)
    assert y1 == x1 and y2 == x2
    assert abs(y1 - (1 - side) / 2) < 1e-7 and abs(y2 - (1 + side) / 2) < 1e-7  # 0.025658, 0.974342
    flat = np.full((224, 224, 3), 200, np.uint8)
    np.testing.assert_array_equal(T.centre_crop(flat), flat)  # 200/255 * 255.5 = 200.39 -> 200
    assert T.centre_crop(np.full((8, 8, 3), 255, np.uint8), size=4).max() == 255  # 255.5 saturates


def test_224_input_is_only_cropped() -> None:
    image = pattern_image(224, 224, 2)
    np.testing.assert_array_equal(T.oft_eval_image(image), T.centre_crop(image))
    np.testing.assert_array_equal(T.oft_eval_image(image, crop=False), image)


def test_jpeg_round_trip_matches_tensorflow(tf_out: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(T.jpeg_round_trip(pattern_image(37, 53, 3)), tf_out["jpeg_37x53"])
    np.testing.assert_array_equal(T.jpeg_round_trip(pattern_image(64, 96, 4)), tf_out["jpeg_64x96"])


@pytest.mark.parametrize(
    "key,size", [("lanczos_down", (24, 30)), ("lanczos_up", (50, 70)), ("lanczos_mixed", (20, 90))]
)
def test_lanczos3_matches_tensorflow(tf_out: dict[str, np.ndarray], key: str, size: tuple[int, int]) -> None:
    got = T.lanczos3_resize(pattern_image(37, 53, 3), *size)
    assert np.abs(got - tf_out[key]).max() < 2e-4  # of 0..255 (float32 summation order)


def test_crop_and_resize_matches_tensorflow(tf_out: dict[str, np.ndarray]) -> None:
    image = pattern_image(40, 50, 5).astype(np.float32) * np.float32(1 / 255)
    for box, expected in zip(tf_out["crop_boxes"], tf_out["crop_out"], strict=True):
        np.testing.assert_allclose(T.crop_and_resize(image, tuple(box), 16, 24), expected, rtol=0, atol=1e-6)


def test_upstream_evaluation_pipeline_is_bit_exact(tf_out: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(T.resize_for_policy(pattern_image(240, 320, 1)), tf_out["policy_240x320"])
    np.testing.assert_array_equal(T.oft_eval_image(pattern_image(256, 256, 0)), tf_out["eval_256"])
