"""GR00T's rotation conversions, as upstream's StateActionTransform applies them (float64 numpy;
upstream uses pytorch3d, conventions reproduced here). The normalisation modes themselves are the
shared preprocessing/normalize.py (GR00T convention); `MODES` maps a data config's mode names to it.

Quaternions are real part first (w, x, y, z); "rotation_6d" is the first two rows of the rotation
matrix; "matrix" is the 3 x 3 matrix row by row; "euler_angles_<order>" composes
R = R_a(e0) R_b(e1) R_c(e2) with r = X, p = Y, y = Z (euler_angles_rpy = XYZ); axis_angle is the
rotation vector (angle = its norm). A rotation converted to another representation and normalised
min_max uses that representation's fixed bounds (ROTATION_BOUNDS), not the dataset's statistics,
as upstream.
"""

from __future__ import annotations

import numpy as np

from vla_inference.preprocessing import normalize as nz

# A data config's normalisation mode -> the shared Normalizer's mode (GR00T convention).
MODES = {"min_max": nz.MIN_MAX, "q99": nz.QUANTILE, "mean_std": nz.MEAN_STD, "binary": nz.BINARY}


# ----------------------------------------------------------------------------------------------
# rotations

_AXES = {"r": 0, "p": 1, "y": 2}


def rotation_dim(rep: str) -> int:
    if rep.startswith("euler_angles_") or rep == "axis_angle":
        return 3
    return {"quaternion": 4, "rotation_6d": 6, "matrix": 9}[rep]


ROTATION_BOUNDS: dict[str, tuple[float, float]] = {
    "rotation_6d": (-1.0, 1.0),
    "quaternion": (-1.0, 1.0),
    "axis_angle": (-np.pi, np.pi),
    "euler_angles": (-np.pi, np.pi),
}


def rotation_bounds(rep: str) -> nz.Stats | None:
    """Fixed min / max statistics of a representation (None: upstream has none, e.g. matrix)."""
    key = "euler_angles" if rep.startswith("euler_angles_") else rep
    if key not in ROTATION_BOUNDS:
        return None
    low, high = ROTATION_BOUNDS[key]
    dim = rotation_dim(rep)
    return nz.Stats(min=np.full(dim, low), max=np.full(dim, high))


def convert_rotation(x: np.ndarray, source: str, target: str) -> np.ndarray:
    """(..., rotation_dim(source)) -> (..., rotation_dim(target)), through the rotation matrix."""
    return from_matrix(to_matrix(np.asarray(x, dtype=np.float64), source), target)


def to_matrix(x: np.ndarray, rep: str) -> np.ndarray:
    if rep == "matrix":
        return x.reshape(*x.shape[:-1], 3, 3)
    if rep == "quaternion":
        return _quaternion_to_matrix(x)
    if rep == "rotation_6d":
        return _rotation_6d_to_matrix(x)
    if rep == "axis_angle":
        return _quaternion_to_matrix(_axis_angle_to_quaternion(x))
    if rep.startswith("euler_angles_"):
        out = np.broadcast_to(np.eye(3), (*x.shape[:-1], 3, 3))
        for i, axis in enumerate(_euler_axes(rep)):
            out = out @ _axis_rotation(axis, x[..., i])
        return out
    raise ValueError(f"unknown rotation representation {rep!r}")


def from_matrix(m: np.ndarray, rep: str) -> np.ndarray:
    if rep == "matrix":
        return m.reshape(*m.shape[:-2], 9)
    if rep == "quaternion":
        return _matrix_to_quaternion(m)
    if rep == "rotation_6d":
        return m[..., :2, :].reshape(*m.shape[:-2], 6)
    if rep == "axis_angle":
        return _quaternion_to_axis_angle(_matrix_to_quaternion(m))
    if rep.startswith("euler_angles_"):
        return _matrix_to_euler(m, _euler_axes(rep))
    raise ValueError(f"unknown rotation representation {rep!r}")


def _euler_axes(rep: str) -> tuple[int, int, int]:
    order = rep.removeprefix("euler_angles_")
    a, b, c = (_AXES[letter] for letter in order)
    return a, b, c


def _axis_rotation(axis: int, angle: np.ndarray) -> np.ndarray:
    """Rotation by `angle` about coordinate axis 0 (X), 1 (Y) or 2 (Z): (..., 3, 3)."""
    c, s = np.cos(angle), np.sin(angle)
    out = np.zeros((*np.shape(angle), 3, 3))
    j, k = (axis + 1) % 3, (axis + 2) % 3
    out[..., axis, axis] = 1.0
    out[..., j, j] = c
    out[..., k, k] = c
    out[..., j, k] = -s
    out[..., k, j] = s
    return out


def _matrix_to_euler(m: np.ndarray, axes: tuple[int, int, int]) -> np.ndarray:
    """Inverse of R = R_a(e0) R_b(e1) R_c(e2) for distinct a, b, c (Tait-Bryan), middle angle in
    [-pi/2, pi/2]. sign = +1 when (a, b, c) is a cyclic order of (X, Y, Z), else -1."""
    a, b, c = axes
    sign = 1.0 if (b - a) % 3 == 1 else -1.0
    middle = np.arcsin(np.clip(sign * m[..., a, c], -1.0, 1.0))
    first = np.arctan2(-sign * m[..., b, c], m[..., c, c])
    last = np.arctan2(-sign * m[..., a, b], m[..., a, a])
    return np.stack([first, middle, last], axis=-1)


def _quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    w, x, y, z = np.moveaxis(q, -1, 0)
    s = 2.0 / np.sum(q * q, axis=-1)
    rows = [
        [1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)],
        [s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)],
        [s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)],
    ]
    return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)


def _matrix_to_quaternion(m: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) with w >= 0, from the best-conditioned of the four formulas."""
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    squares = np.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], axis=-1
    )
    # 4 * (w, x, y, z) * component, one row per choice of the component divided by
    rows = np.stack(
        [
            np.stack([squares[..., 0], m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0],
                      m[..., 1, 0] - m[..., 0, 1]], axis=-1),
            np.stack([m[..., 2, 1] - m[..., 1, 2], squares[..., 1], m[..., 1, 0] + m[..., 0, 1],
                      m[..., 0, 2] + m[..., 2, 0]], axis=-1),
            np.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] + m[..., 0, 1], squares[..., 2],
                      m[..., 1, 2] + m[..., 2, 1]], axis=-1),
            np.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 2, 0] + m[..., 0, 2], m[..., 2, 1] + m[..., 1, 2],
                      squares[..., 3]], axis=-1),
        ],
        axis=-2,
    )  # fmt: skip
    best = np.argmax(squares, axis=-1)
    root = np.sqrt(np.maximum(np.take_along_axis(squares, best[..., None], axis=-1), 0.0))
    chosen = np.take_along_axis(rows, best[..., None, None], axis=-2)[..., 0, :]
    q = chosen / (2.0 * np.maximum(root, 0.1))
    return np.where(q[..., :1] < 0, -q, q)


def _axis_angle_to_quaternion(v: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(v, axis=-1, keepdims=True)
    half = angle / 2
    small = angle < 1e-6
    factor = np.where(small, 0.5 - angle**2 / 48, np.sin(half) / np.where(small, 1.0, angle))
    return np.concatenate([np.cos(half), v * factor], axis=-1)


def _quaternion_to_axis_angle(q: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(q[..., 1:], axis=-1, keepdims=True)
    half = np.arctan2(norm, q[..., :1])
    angle = 2 * half
    small = np.abs(angle) < 1e-6
    factor = np.where(small, 0.5 - angle**2 / 48, np.sin(half) / np.where(small, 1.0, angle))
    return q[..., 1:] / factor


def _rotation_6d_to_matrix(d6: np.ndarray) -> np.ndarray:
    """Gram-Schmidt on the two rows, third row = their cross product."""
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = a1 / np.linalg.norm(a1, axis=-1, keepdims=True)
    b2 = a2 - np.sum(b1 * a2, axis=-1, keepdims=True) * b1
    b2 = b2 / np.linalg.norm(b2, axis=-1, keepdims=True)
    return np.stack([b1, b2, np.cross(b1, b2)], axis=-2)
