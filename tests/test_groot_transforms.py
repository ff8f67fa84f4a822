"""GR00T N1.5 state / action / video maths against values worked out by hand from the formulas.

Formulas (upstream's StateActionTransform, Normalizer and eval video transforms):
  min_max   2 (x - min) / (max - min) - 1, no clipping, 0 where min == max; inverse unclipped
  q99       2 (x - q01) / (q99 - q01) - 1, clipped to [-1, 1], x where q01 == q99; inverse unclipped
  mean_std  (x - mean) / std, x where std == 0; inverse y std + mean
  binary    x > 0.5
  sin/cos   [sin x_1..sin x_n, cos x_1..cos x_n]
  video     /255 -> centre crop int(0.95 H) x int(0.95 W) at round((H - h) / 2) -> bilinear antialias
            resize -> (x * 255) truncated to uint8 -> (x / 255 - 0.5) / 0.5
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vla_inference.models.groot import rotations as rot
from vla_inference.models.groot.embodiments import KeyTransform
from vla_inference.models.groot.video import crop_box, frame_to_pixels, resize_float
from vla_inference.preprocessing import normalize as nz


def _normalizer(mode: str, **values: list[float]) -> nz.Normalizer:
    """A data config's mode ("min_max", "q99", ...) as GR00T serves it: the shared Normalizer,
    the mode mapped through rotations.MODES, GR00T's convention."""
    stats = nz.Stats.of({k: np.asarray(v, dtype=np.float64) for k, v in values.items()})
    return nz.Normalizer(rot.MODES[mode], stats, nz.GROOT)


# --- normalisation -------------------------------------------------------------------------------


def test_data_config_modes_map_to_the_shared_normalizer() -> None:
    assert rot.MODES == {
        "min_max": nz.MIN_MAX,
        "q99": nz.QUANTILE,
        "mean_std": nz.MEAN_STD,
        "binary": nz.BINARY,
    }


def test_min_max_does_not_clip_and_zeroes_a_constant_dimension() -> None:
    norm = _normalizer("min_max", min=[0.0, -1.0, 2.0], max=[2.0, 1.0, 2.0])
    # 2 * (5 - 0) / 2 - 1 = 4;  2 * (0.5 + 1) / 2 - 1 = 0.5;  min == max -> 0 (upstream Normalizer)
    np.testing.assert_allclose(norm.normalize(np.array([5.0, 0.5, 7.0])), [4.0, 0.5, 0.0])
    # -3 -> 2 * (-3) / 2 - 1 = -4
    assert norm.normalize(np.array([-3.0, 0, 0]))[0] == pytest.approx(-4.0, abs=1e-12)


def test_min_max_inverse_does_not_clip() -> None:
    norm = _normalizer("min_max", min=[0.0, -1.0, 2.0], max=[2.0, 1.0, 2.0])
    # (4 + 1) / 2 * 2 + 0 = 5;  (0.5 + 1) / 2 * 2 - 1 = 0.5;  (3 + 1) / 2 * 0 + 2 = 2
    np.testing.assert_allclose(norm.unnormalize(np.array([4.0, 0.5, 3.0])), [5.0, 0.5, 2.0])
    # -1.5 -> (-0.5) / 2 * 2 + 0 = -0.5, below min: not clipped
    assert norm.unnormalize(np.array([-1.5, 0, 0]))[0] == pytest.approx(-0.5, abs=1e-12)


def test_q99_clips_and_passes_a_constant_dimension_through() -> None:
    norm = _normalizer("q99", q01=[0.0, -1.0, 3.0], q99=[2.0, 1.0, 3.0])
    # 5 -> 4 -> clipped 1;  0.5 -> 0.5;  q01 == q99 -> x = 0.25 (then clipped: stays)
    np.testing.assert_allclose(norm.normalize(np.array([5.0, 0.5, 0.25])), [1.0, 0.5, 0.25])
    # -3 -> -4 -> -1;  0 -> 0;  pass-through 7 -> clipped to 1
    np.testing.assert_allclose(norm.normalize(np.array([-3.0, 0.0, 7.0])), [-1.0, 0.0, 1.0])


def test_q99_inverse_does_not_clip() -> None:
    norm = _normalizer("q99", q01=[0.0], q99=[2.0])
    # (1.5 + 1) / 2 * 2 + 0 = 2.5 (above q99); (-2 + 1) / 2 * 2 = -1
    np.testing.assert_allclose(norm.unnormalize(np.array([1.5, -2.0])[:, None])[:, 0], [2.5, -1.0])


def test_mean_std_and_zero_std() -> None:
    norm = _normalizer("mean_std", mean=[1.0, 0.5], std=[2.0, 0.0])
    # (5 - 1) / 2 = 2;  std == 0 -> x passes through: 3
    np.testing.assert_allclose(norm.normalize(np.array([5.0, 3.0])), [2.0, 3.0])
    # inverse: 2 * 2 + 1 = 5;  3 * 0 + 0.5 = 0.5 (upstream's inverse has no special case)
    np.testing.assert_allclose(norm.unnormalize(np.array([2.0, 3.0])), [5.0, 0.5])


def test_binary_both_directions() -> None:
    norm = _normalizer("binary")
    x = np.array([0.5, 0.51, -1.0, 2.0])
    np.testing.assert_array_equal(norm.normalize(x), [0.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(norm.unnormalize(x), [0.0, 1.0, 0.0, 1.0])


def test_sin_cos_per_key() -> None:
    sin_cos = nz.Normalizer(nz.SIN_COS)
    out = sin_cos.normalize(np.array([0.0, math.pi / 2, math.pi]))
    np.testing.assert_allclose(out, [0.0, 1.0, 0.0, 1.0, 0.0, -1.0], atol=1e-12)
    key = KeyTransform("left_arm", raw_dim=2, model_dim=4, normalizer=sin_cos)
    np.testing.assert_allclose(key.encode(np.array([math.pi / 6, 0.0])), [0.5, 0.0, math.sqrt(3) / 2, 1.0])


def test_key_without_mode_passes_through() -> None:
    key = KeyTransform("eef_position_delta", raw_dim=3, model_dim=3)
    x = np.array([[3.0, -7.5, 0.25]])
    np.testing.assert_array_equal(key.encode(x), x)
    np.testing.assert_array_equal(key.decode(x), x)


# --- rotations -------------------------------------------------------------------------------------

C, S = 0.5, math.sqrt(3) / 2  # cos, sin of 60 degrees


def test_quaternion_to_rotation_6d_by_hand() -> None:
    # 60 degrees about z: q = (cos 30, 0, 0, sin 30); R rows (c, -s, 0), (s, c, 0), (0, 0, 1)
    q = np.array([math.cos(math.pi / 6), 0.0, 0.0, math.sin(math.pi / 6)])
    np.testing.assert_allclose(
        rot.convert_rotation(q, "quaternion", "rotation_6d"), [C, -S, 0, S, C, 0], atol=1e-12
    )
    # Not unit length: upstream's formula divides by |q|^2, so 2q is the same rotation.
    np.testing.assert_allclose(
        rot.convert_rotation(2 * q, "quaternion", "rotation_6d"), [C, -S, 0, S, C, 0], atol=1e-12
    )


def test_euler_rpy_composes_x_then_y_then_z() -> None:
    # rpy = XYZ: R = Rx(r) Ry(p) Rz(y). Roll only: rows (1, 0, 0), (0, c, -s).
    np.testing.assert_allclose(
        rot.convert_rotation(np.array([math.pi / 3, 0, 0]), "euler_angles_rpy", "rotation_6d"),
        [1, 0, 0, 0, C, -S],
        atol=1e-12,
    )
    # Rx(a) Ry(b): first row is (cos b, 0, sin b) whatever a; second (sin a sin b, cos a, -sin a cos b)
    a, b = 0.3, -0.7
    m = rot.to_matrix(np.array([a, b, 0.0]), "euler_angles_rpy")
    np.testing.assert_allclose(m[0], [math.cos(b), 0, math.sin(b)], atol=1e-12)
    np.testing.assert_allclose(m[1], [math.sin(a) * math.sin(b), math.cos(a), -math.sin(a) * math.cos(b)])
    # ypr = ZYX: yaw first: R = Rz(y) Ry(p) Rx(r); its [2][0] is -sin(p)
    m = rot.to_matrix(np.array([0.2, b, 0.4]), "euler_angles_ypr")
    assert m[2, 0] == pytest.approx(-math.sin(b))


def test_axis_angle_by_hand() -> None:
    # (0, 0, pi/3): 60 degrees about z
    np.testing.assert_allclose(
        rot.convert_rotation(np.array([0, 0, math.pi / 3]), "axis_angle", "rotation_6d"),
        [C, -S, 0, S, C, 0],
        atol=1e-12,
    )
    # back: the rotation vector of 60 degrees about z; tiny angles stay finite
    np.testing.assert_allclose(
        rot.convert_rotation(np.array([C, -S, 0, S, C, 0]), "rotation_6d", "axis_angle"),
        [0, 0, math.pi / 3],
        atol=1e-12,
    )
    np.testing.assert_allclose(rot.convert_rotation(np.zeros(3), "axis_angle", "axis_angle"), np.zeros(3))


def test_matrix_to_quaternion_is_standardised() -> None:
    # 180 degrees about x: (0, 1, 0, 0); w >= 0 always (upstream standardises)
    m = np.diag([1.0, -1.0, -1.0])
    np.testing.assert_allclose(rot.from_matrix(m, "quaternion"), [0, 1, 0, 0], atol=1e-12)
    q = np.array([-0.5, 0.5, 0.5, 0.5])  # w < 0
    np.testing.assert_allclose(rot.convert_rotation(q, "quaternion", "quaternion"), -q, atol=1e-12)


@pytest.mark.parametrize("rep", ["quaternion", "rotation_6d", "axis_angle", "matrix"] + [
    f"euler_angles_{o}" for o in ("rpy", "ryp", "pry", "pyr", "yrp", "ypr")
])  # fmt: skip
def test_every_representation_round_trips(rep: str) -> None:
    rng = np.random.default_rng(0)
    q = rng.normal(size=(20, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    m = rot.to_matrix(q, "quaternion")
    np.testing.assert_allclose(
        np.einsum("nij,nkj->nik", m, m), np.broadcast_to(np.eye(3), m.shape), atol=1e-12
    )
    again = rot.to_matrix(rot.from_matrix(m, rep), rep)
    np.testing.assert_allclose(again, m, atol=1e-9)
    assert rot.from_matrix(m, rep).shape == (20, rot.rotation_dim(rep))


# --- video -----------------------------------------------------------------------------------------


def test_crop_box_by_hand() -> None:
    # 48 x 64: int(45.6) = 45, int(60.8) = 60; top round(1.5) = 2, left round(2.0) = 2
    assert crop_box(48, 64, 0.95) == (2, 2, 45, 60)
    # 256 x 256: int(243.2) = 243, round(6.5) = 6 (Python rounds half to even, as torchvision)
    assert crop_box(256, 256, 0.95) == (6, 6, 243, 243)


def test_truncation_not_rounding() -> None:
    """Columns alternating 0, 255, width 8 -> 4: the antialiased bilinear (triangle) filter of
    scale 2 weighs taps at distance 0.5, 1.5 px by 0.75, 0.25 (edges renormalised), so:
      out0 = 255 * 0.75 / 1.75 = 109.29 -> 109;  out1 = out2 = 255 * (0.25 + 0.75) / 2 = 127.5 -> 127
      (rounding would give 128);  out3 = 255 * (0.25 + 0.75) / 1.75 = 145.71 -> 145."""
    frame = np.zeros((4, 8, 3), np.uint8)
    frame[:, 1::2] = 255
    pixels = frame_to_pixels(frame, 4, resolution=None, crop_scale=None)
    expected = (np.array([109, 127, 127, 145]) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(pixels[0, 0], expected, atol=1e-6)
    np.testing.assert_allclose(pixels[:, 2], np.broadcast_to(expected, (3, 4)), atol=1e-6)


def _triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) antialiased bilinear weights from the definition: output i samples the input
    at centre (i + 0.5) * scale with a triangle of half-width max(scale, 1) input pixels, taps
    renormalised at the borders (scale = n_in / n_out)."""
    scale = n_in / n_out
    width = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    taps = np.arange(n_in) + 0.5
    w = np.clip(1.0 - np.abs(taps[None, :] - centres[:, None]) / width, 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


@pytest.mark.parametrize(("n_in", "n_out"), [(45, 32), (60, 32), (45, 224), (48, 96)])
def test_resize_matches_the_triangle_filter(n_in: int, n_out: int) -> None:
    rng = np.random.default_rng(n_in + n_out)
    image = rng.random((3, n_in, n_in + 7))
    expected = np.einsum(
        "oh,chw,pw->cop", _triangle_weights(n_in, n_out), image, _triangle_weights(n_in + 7, 50)
    )
    got = resize_float(torch.from_numpy(image)[None], n_out, 50)[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_non_square_frame_through_the_whole_transform() -> None:
    """A 48 x 64 frame (metadata resolution 64 x 48) -> crop rows 2..46, columns 2..61 -> 32 x 32,
    truncated, scaled; against the triangle-filter reference of the same steps."""
    rng = np.random.default_rng(7)
    frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    got = frame_to_pixels(frame, 32, resolution=(64, 48), crop_scale=0.95)
    crop = frame[2:47, 2:62].astype(np.float64).transpose(2, 0, 1) / 255.0
    ref = np.einsum("oh,chw,pw->cop", _triangle_weights(45, 32), crop, _triangle_weights(60, 32)) * 255
    # The float32 pipeline and this float64 reference may land on either side of an integer only
    # where the value is within float32 noise of it: compare everywhere else.
    clear = np.abs(ref - np.round(ref)) > 1e-3
    assert clear.mean() > 0.99
    u8 = np.round((got + 1) / 2 * 255)
    np.testing.assert_array_equal(u8[clear], np.floor(ref)[clear])
    assert got.shape == (3, 32, 32) and got.dtype == np.float32


def test_other_frame_sizes_are_resized_to_the_metadata_resolution_first() -> None:
    """A 96 x 96 frame for a 64 x 48 (width x height) camera: resized to 48 rows x 64 columns, then
    cropped as a 48 x 64 frame; not cropped as a square."""
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    got = frame_to_pixels(frame, 32, resolution=(64, 48), crop_scale=0.95)
    as_float = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255.0
    at_resolution = resize_float(as_float, 48, 64)[..., 2:47, 2:62]
    expected = (resize_float(at_resolution, 32, 32) * 255).to(torch.uint8).float() / 255.0 * 2 - 1
    np.testing.assert_allclose(got, expected[0].numpy(), atol=1e-6)
    square = frame_to_pixels(frame, 32, resolution=None, crop_scale=0.95)
    assert not np.allclose(got, square, atol=0.05)
