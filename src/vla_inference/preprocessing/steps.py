"""Preprocessing and postprocessing steps the families compose (openpi's transforms, typed):

    cameras   CameraMap        observation images by name -> the model's camera slots, checked;
                               camera_roles: a checkpoint's camera names -> the server's names
    images    (per family)     resize / normalise pixels: preprocessing/images.py and the family
    state     StateInput       joint positions -> normalised, zero-padded model state
    prompt    (per family)     instruction (+ state) -> token ids: the family's tokenizer
    actions   ActionOutput     model actions (normalised, padded) -> the robot's units and size

Each step is a small frozen object or function with its own unit test (tests/test_steps.py); a
family's `prepare` calls them in order and its `postprocess` calls the inverse chain.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vla_inference.models.base import InvalidObservation, canonical_camera
from vla_inference.preprocessing.normalize import Normalizer


@dataclass(frozen=True)
class CameraSlot:
    """One camera the model sees: its name in the server's vocabulary (ModelInfo.camera_names),
    other names a robot may send it under, and whether the model needs it."""

    name: str
    aliases: tuple[str, ...] = ()
    required: bool = False


@dataclass(frozen=True)
class CameraMap:
    """Observation images by name -> one image (or None) per slot, in slot order.

    Names are matched after `canonical_camera` (trimmed, lower-case, the server's aliases such as
    "wrist" -> "left_wrist") and against each slot's own aliases. A missing required camera, an
    image that is not (H, W, 3) uint8 RGB, the same camera twice, fewer than `at_least` cameras,
    or (with `refuse_unknown`) a name no slot takes is InvalidObservation on "cameras"."""

    slots: tuple[CameraSlot, ...]
    at_least: int = 1
    refuse_unknown: bool = True
    model: str = "this model"  # for messages: whose cameras these are

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(slot.name for slot in self.slots)

    @functools.cached_property
    def _lookup(self) -> dict[str, int]:
        """Every name a slot is taken under (lower-case) -> its index."""
        lookup: dict[str, int] = {}
        for index, slot in enumerate(self.slots):
            for name in (slot.name, *slot.aliases):
                lookup.setdefault(name.lower(), index)
        return lookup

    def __call__(self, images: Mapping[str, np.ndarray]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = [None] * len(self.slots)
        unknown: list[str] = []
        for given, image in images.items():
            index = self._lookup.get(given.strip().lower())
            if index is None:
                index = self._lookup.get(canonical_camera(given))
            if index is None:
                unknown.append(given)
                continue
            if out[index] is not None:
                raise InvalidObservation(
                    "cameras", f"camera {self.slots[index].name!r} is given twice (under an alias)"
                )
            out[index] = check_image(image, self.slots[index].name)
        if unknown and self.refuse_unknown:
            raise InvalidObservation(
                "cameras",
                f"unknown camera(s) {', '.join(map(repr, sorted(unknown)))}; "
                f"{self.model} takes: {', '.join(self.names)}",
            )
        missing = [
            slot.name for slot, image in zip(self.slots, out, strict=True) if slot.required and image is None
        ]
        if missing:
            raise InvalidObservation(
                "cameras",
                f"{self.model} needs cameras {', '.join(s.name for s in self.slots if s.required)}; "
                f"missing {', '.join(map(repr, missing))}",
            )
        if sum(image is not None for image in out) < self.at_least:
            raise InvalidObservation(
                "cameras", f"at least {self.at_least} camera image is required ({', '.join(self.names)})"
            )
        return out


BASE_CAMERA = "base"  # the main camera: what Observation.camera_image arrives as


def camera_roles(names: Sequence[str]) -> list[str]:
    """The server's camera name for each of a checkpoint's camera names (short, lower-case), in order.

    The server's camera vocabulary is "base", "left_wrist", "right_wrist" (the transport maps
    "wrist" to "left_wrist") plus free names. A name naming a wrist or hand camera becomes
    "right_wrist" when it says right, else "left_wrist"; the first other name is "base"; any
    other name (or a second one for a taken role) keeps its own (e.g. "exterior_image_2").
    """
    base = next((name for name in names if _wrist_side(name) is None), None)
    roles: list[str] = []
    for name in names:
        role = _wrist_side(name) or (BASE_CAMERA if name == base else name)
        roles.append(name if role in roles else role)
    return roles


def _wrist_side(name: str) -> str | None:
    """ "right_wrist" / "left_wrist" for a camera name naming a wrist or hand camera, else None."""
    if "wrist" not in name and "hand" not in name:
        return None
    return "right_wrist" if "right" in name else "left_wrist"


def check_image(image: np.ndarray, camera: str) -> np.ndarray:
    """The image if it is a non-empty (H, W, 3) uint8 RGB array, else InvalidObservation."""
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or image.shape[2] != 3
        or 0 in image.shape
    ):
        shape = getattr(image, "shape", None)
        raise InvalidObservation(
            "cameras", f"camera {camera!r}: expected an (H, W, 3) uint8 RGB image, got {shape}"
        )
    return image


def pad_to(x: np.ndarray, width: int) -> np.ndarray:
    """(..., n) -> (..., width) float32, zero-padded (n <= width)."""
    out = np.zeros((*x.shape[:-1], width), np.float32)
    out[..., : x.shape[-1]] = x
    return out


@dataclass(frozen=True)
class StateInput:
    """Joint positions (robot units) -> the model's state: normalised (None: as sent), float32,
    zero-padded to `width`. `normalized` gives the unpadded values (pi0.5 puts them in its prompt)."""

    normalizer: Normalizer | None
    width: int

    def normalized(self, joints: np.ndarray) -> np.ndarray:
        joints = np.asarray(joints, np.float32)
        if self.normalizer is None:
            return joints.astype(np.float32)
        return self.normalizer.normalize(joints).astype(np.float32)

    def __call__(self, joints: np.ndarray) -> np.ndarray:
        return pad_to(self.normalized(joints), self.width)


@dataclass(frozen=True)
class ActionOutput:
    """Model actions (H, A) in model units -> (rows, dims) float32 in the robot's units; and the
    inverse for real-time chunking (robot actions -> model units at the model's width)."""

    normalizer: Normalizer | None
    rows: int  # actions returned: min(VLA_CHUNK_SIZE, horizon)
    dims: int  # the robot's action dimensions
    width: int  # the model's (padded) action width

    def __call__(self, actions: np.ndarray) -> np.ndarray:
        robot = actions if self.normalizer is None else self.normalizer.unnormalize(actions)
        return np.ascontiguousarray(robot[: self.rows, : self.dims], dtype=np.float32)

    def to_model(self, actions: np.ndarray) -> np.ndarray:
        """(N, dims) robot units -> (N, width) model units, zero-padded."""
        normalized = actions if self.normalizer is None else self.normalizer.normalize(actions)
        return pad_to(np.asarray(normalized, np.float32), self.width)
