"""The one normaliser (preprocessing/normalize.py) against each upstream's formulas, by hand values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vla_inference.preprocessing import normalize as nz

MEAN = np.array([1.0, -2.0, 0.5])
STD = np.array([2.0, 0.5, 0.0])
Q01 = np.array([-1.0, 0.0, 3.0])
Q99 = np.array([3.0, 10.0, 3.0])


def test_openpi_adds_its_epsilon_on_both_sides() -> None:
    """openpi shared/normalize.py: (x - mean) / (std + 1e-6), quantiles into [-1, 1] with + 1e-6."""
    z = nz.Normalizer(nz.MEAN_STD, nz.Stats(mean=MEAN, std=STD), nz.OPENPI)
    x = np.array([5.0, -1.0, 0.5])
    np.testing.assert_allclose(z.normalize(x), (x - MEAN) / (STD + 1e-6), rtol=1e-15)
    np.testing.assert_allclose(z.unnormalize(z.normalize(x)), x, rtol=1e-12)
    q = nz.Normalizer(nz.QUANTILE, nz.Stats(q01=Q01, q99=Q99), nz.OPENPI)
    x = np.array([5.0, -1.0, 3.0])
    y = q.normalize(x)
    np.testing.assert_allclose(y, (x - Q01) / (Q99 - Q01 + 1e-6) * 2 - 1, rtol=1e-15)
    assert y[2] == pytest.approx(-1.0)  # zero range: the epsilon keeps it finite
    np.testing.assert_allclose(q.unnormalize(y), x, atol=1e-12)


def test_lerobot_mean_std_inverse_has_no_epsilon_and_zero_ranges_use_it() -> None:
    """LeRobot normalize_processor.py: (x - mean) / (std + eps), inverse y * std + mean; a zero
    quantile range is replaced by eps (on both sides)."""
    z = nz.Normalizer(nz.MEAN_STD, nz.Stats(mean=MEAN, std=STD), nz.LEROBOT, eps=1e-3)
    y = z.normalize(np.array([3.0, -1.0, 0.6]))
    assert y.dtype == np.float32  # LeRobot normalises float32 tensors
    np.testing.assert_allclose(y, [2.0 / 2.001, 1.0 / 0.501, 0.1 / 1e-3], rtol=1e-6)
    np.testing.assert_allclose(z.unnormalize(np.array([1.0, 1.0, 1.0])), MEAN + STD)
    q = nz.Normalizer(nz.QUANTILE, nz.Stats(q01=Q01, q99=Q99), nz.LEROBOT, eps=1e-3)
    np.testing.assert_allclose(q.normalize(np.array([1.0, 5.0, 3.0005])), [0.0, 0.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(q.unnormalize(np.array([1.0, -1.0, 0.0])), [3.0, 0.0, 3.0 + 1e-3 / 2])


def test_groot_modes_and_their_degenerate_ranges() -> None:
    """GR00T StateActionTransform: min_max unclipped (0 where min == max); q99 clipped (x passes
    where q01 == q99, then clipped); mean_std (x passes where std == 0); inverses never clip."""
    lo, hi = np.array([0.0, 1.0, 2.0]), np.array([4.0, 1.0, 6.0])
    mm = nz.Normalizer(nz.MIN_MAX, nz.Stats(min=lo, max=hi), nz.GROOT)
    np.testing.assert_allclose(mm.normalize(np.array([6.0, 7.0, 4.0])), [2.0, 0.0, 0.0])
    np.testing.assert_allclose(mm.unnormalize(np.array([2.0, 0.5, -3.0])), [6.0, 1.0, -2.0])
    q = nz.Normalizer(nz.QUANTILE, nz.Stats(q01=lo, q99=hi), nz.GROOT)
    np.testing.assert_allclose(q.normalize(np.array([6.0, 0.25, 4.0])), [1.0, 0.25, 0.0])
    np.testing.assert_allclose(q.normalize(np.array([-2.0, 7.0, 9.0])), [-1.0, 1.0, 1.0])
    np.testing.assert_allclose(q.unnormalize(np.array([3.0, 0.0, -1.0])), [8.0, 1.0, 2.0])
    ms = nz.Normalizer(nz.MEAN_STD, nz.Stats(mean=MEAN, std=STD), nz.GROOT)
    np.testing.assert_allclose(ms.normalize(np.array([3.0, -1.0, 7.0])), [1.0, 2.0, 7.0])
    np.testing.assert_allclose(ms.unnormalize(np.array([1.0, 2.0, 7.0])), [3.0, -1.0, 0.5])


def test_groot_n17_clips_both_ways_and_zeroes_nearly_equal_ranges() -> None:
    """GR00T N1.7 (gr00t/data/utils.py): min / max (q01 / q99 with use_percentiles) to [-1, 1], 0
    where np.isclose(high, low) (1e-8 absolute, 1e-5 relative: not only where they are equal),
    clipped when clip_outliers; the inverse clips the model's side first; mean / std passes x
    where std is 0 (both ways) and clips only when told (actions)."""
    lo, hi = np.array([0.0, 1.0, 100.0]), np.array([4.0, 1.0 + 5e-9, 100.0005])
    q = nz.Normalizer(nz.QUANTILE, nz.Stats(q01=lo, q99=hi), nz.GROOT17)
    np.testing.assert_allclose(q.normalize(np.array([1.0, 3.0, 7.0])), [-0.5, 0.0, 0.0])
    np.testing.assert_allclose(q.normalize(np.array([9.0, 0.0, 0.0])), [1.0, 0.0, 0.0])  # clipped
    unclipped = nz.Normalizer(nz.MIN_MAX, nz.Stats(min=lo, max=hi), nz.GROOT17, clip=False)
    assert unclipped.normalize(np.array([9.0, 0.0, 0.0]))[0] == pytest.approx(3.5)
    np.testing.assert_allclose(q.unnormalize(np.array([3.0, 0.5, -0.5])), [4.0, 1.0 + 3.75e-9, 100.000125])
    ms = nz.Normalizer(nz.MEAN_STD, nz.Stats(mean=MEAN, std=STD), nz.GROOT17)
    np.testing.assert_allclose(ms.normalize(np.array([3.0, -1.0, 7.0])), [1.0, 2.0, 7.0])
    np.testing.assert_allclose(ms.unnormalize(np.array([5.0, 2.0, 7.0])), [11.0, -1.0, 7.0])
    clipped = nz.Normalizer(nz.MEAN_STD, nz.Stats(mean=MEAN, std=STD), nz.GROOT17, clip=True)
    np.testing.assert_allclose(clipped.normalize(np.array([3.0, -1.0, 7.0])), [1.0, 1.0, 1.0])


def test_openvla_bounds_honour_the_mask_and_clip_only_the_normalised_side() -> None:
    """OpenVLA: where(mask, 0.5 (y + 1) (q99 - q01) + q01, y) (eps 0); OFT's proprio:
    clip(where(mask, 2 (x - q01) / (q99 - q01 + 1e-8) - 1, x), -1, 1), and its actions un-normalised
    with the same + 1e-8."""
    mask = np.array([True, True, False])
    stats = nz.Stats(q01=Q01, q99=Q99, mask=mask)
    vla = nz.Normalizer(nz.QUANTILE, stats, nz.BOUNDS, eps=0.0)
    np.testing.assert_allclose(vla.unnormalize(np.array([0.0, 2.0, 0.7])), [1.0, 15.0, 0.7])  # unclipped
    oft = nz.Normalizer(nz.QUANTILE, stats, nz.BOUNDS)
    proprio = oft.normalize(np.array([1.0, 20.0, 5.0]))
    np.testing.assert_allclose(proprio, [2 * 2 / (4 + 1e-8) - 1, 1.0, 1.0])  # masked dim passed, then clipped
    np.testing.assert_allclose(oft.unnormalize(np.array([0.0, 1.0, 0.7])), [1 + 2e-8 / 2, 10 + 1e-8, 0.7])


def test_sin_cos_binary_identity_and_padding() -> None:
    np.testing.assert_allclose(
        nz.Normalizer(nz.SIN_COS).normalize(np.array([0.0, np.pi / 2])), [0.0, 1.0, 1.0, 0.0], atol=1e-12
    )
    with pytest.raises(nz.StatsError):
        nz.Normalizer(nz.SIN_COS).unnormalize(np.zeros(2))
    np.testing.assert_array_equal(nz.Normalizer(nz.BINARY).normalize(np.array([0.2, 0.6])), [0.0, 1.0])
    np.testing.assert_array_equal(nz.Normalizer(nz.BINARY).unnormalize(np.array([0.5, 0.51])), [0.0, 1.0])
    np.testing.assert_array_equal(nz.Normalizer(nz.IDENTITY).normalize(np.array([3.0])), [3.0])
    z = nz.Normalizer(nz.MEAN_STD, nz.Stats(mean=MEAN[:2], std=STD[:2]), nz.OPENPI)
    padded = z.normalize(np.array([[1.0, -2.0, 9.0, 8.0]]))  # dims past the statistics pass through
    np.testing.assert_allclose(padded, [[0.0, 0.0, 9.0, 8.0]])


def test_statistics_that_cannot_serve_a_mode_are_refused() -> None:
    with pytest.raises(nz.StatsError, match="needs q01, q99"):
        nz.Normalizer(nz.QUANTILE, nz.Stats(mean=MEAN, std=STD))
    with pytest.raises(nz.StatsError, match="different lengths"):
        nz.Normalizer(nz.MEAN_STD, nz.Stats(mean=MEAN, std=STD[:2]))
    with pytest.raises(nz.StatsError, match="NaN"):
        nz.Stats.of({"mean": [1.0, float("nan")]})
    assert nz.Stats.of({"mean": [1, 2], "other": "ignored"}).size == 2


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from([nz.OPENPI, nz.LEROBOT, nz.GROOT]),
    st.sampled_from([nz.MEAN_STD, nz.QUANTILE, nz.MIN_MAX]),
    st.lists(st.floats(-50, 50), min_size=3, max_size=3),
)
def test_unnormalize_inverts_normalize_inside_the_range(
    convention: str, mode: str, values: list[float]
) -> None:
    stats = nz.Stats(mean=MEAN, std=np.array([2.0, 0.5, 3.0]), q01=Q01, q99=Q99 + 1, min=Q01, max=Q99 + 1)
    n = nz.Normalizer(mode, stats, convention)
    x = np.clip(np.array(values), Q01, Q99 + 1)  # GR00T's quantile clips outside its range
    np.testing.assert_allclose(n.unnormalize(n.normalize(x)), x, atol=1e-5, rtol=1e-5)
