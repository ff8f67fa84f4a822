"""The preprocessing / postprocessing steps (preprocessing/steps.py), each alone."""

from __future__ import annotations

import numpy as np
import pytest

from vla_inference.models.base import InvalidObservation
from vla_inference.preprocessing import normalize as nz
from vla_inference.preprocessing.steps import ActionOutput, CameraMap, CameraSlot, StateInput, pad_to

IMAGE = np.zeros((4, 6, 3), np.uint8)


def _map(**kw: object) -> CameraMap:
    slots = (CameraSlot("base"), CameraSlot("left_wrist", aliases=("gripper",)), CameraSlot("right_wrist"))
    return CameraMap(slots, **kw)  # type: ignore[arg-type]


def test_cameras_go_to_their_slots_by_name_alias_and_server_alias() -> None:
    other = np.ones((2, 2, 3), np.uint8)
    out = _map()({"BASE": IMAGE, "wrist": other})  # case, and the server's alias wrist -> left_wrist
    assert out[0] is IMAGE and out[1] is other and out[2] is None
    assert _map()({"gripper": other})[1] is other  # the slot's own alias


@pytest.mark.parametrize(
    ("images", "needle"),
    [
        ({"top": IMAGE}, "unknown camera(s) 'top'; this model takes: base, left_wrist, right_wrist"),
        ({"wrist": IMAGE, "left_wrist": IMAGE}, "given twice"),
        ({}, "at least 1 camera image is required"),
        ({"base": np.zeros((4, 6), np.uint8)}, "expected an (H, W, 3) uint8 RGB image"),
        ({"base": np.zeros((4, 6, 3), np.float32)}, "expected an (H, W, 3) uint8 RGB image"),
        ({"base": np.zeros((0, 6, 3), np.uint8)}, "expected an (H, W, 3) uint8 RGB image"),
    ],
)
def test_bad_camera_sets_are_refused_naming_the_field(images: dict[str, np.ndarray], needle: str) -> None:
    with pytest.raises(InvalidObservation) as err:
        _map()(images)
    assert err.value.field == "cameras" and needle in err.value.message


def test_required_cameras_and_ignored_extras() -> None:
    groot_like = CameraMap(
        (
            CameraSlot("base", ("ego_view", "video.ego_view"), required=True),
            CameraSlot("left_wrist", required=True),
        ),
        at_least=0,
        refuse_unknown=False,
        model="embodiment 'gr1'",
    )
    with pytest.raises(
        InvalidObservation, match="embodiment 'gr1' needs cameras base, left_wrist; missing 'left_wrist'"
    ):
        groot_like({"video.ego_view": IMAGE})
    out = groot_like({"ego_view": IMAGE, "left_wrist": IMAGE, "exterior": IMAGE})  # an extra is ignored
    assert all(image is IMAGE for image in out)


def test_state_is_normalised_then_zero_padded() -> None:
    step = StateInput(
        nz.Normalizer(nz.MEAN_STD, nz.Stats(mean=np.array([1.0, 1.0]), std=np.array([2.0, 4.0])), nz.OPENPI),
        5,
    )
    state = step(np.array([3.0, -3.0], np.float32))
    assert state.dtype == np.float32 and state.shape == (5,)
    np.testing.assert_allclose(state, [2 / (2 + 1e-6), -4 / (4 + 1e-6), 0, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(StateInput(None, 3)(np.array([7.0])), [7.0, 0.0, 0.0])


def test_actions_are_unnormalised_and_sliced_to_the_robot() -> None:
    norm = nz.Normalizer(nz.QUANTILE, nz.Stats(q01=np.zeros(2), q99=np.full(2, 4.0)), nz.LEROBOT)
    out = ActionOutput(norm, rows=2, dims=2, width=4)
    model = np.array([[1.0, -1.0, 9.0, 9.0], [0.0, 0.0, 9.0, 9.0], [5.0, 5.0, 5.0, 5.0]], np.float32)
    np.testing.assert_allclose(out(model), [[4.0, 0.0], [2.0, 2.0]])
    assert out(model).dtype == np.float32 and out(model).flags.c_contiguous
    back = out.to_model(np.array([[4.0, 0.0]]))
    np.testing.assert_allclose(back, [[1.0, -1.0, 0.0, 0.0]])  # the inverse, padded to the model's width
    np.testing.assert_array_equal(pad_to(np.ones((2, 1)), 3), [[1, 0, 0], [1, 0, 0]])
