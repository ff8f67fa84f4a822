"""GR00T N1.7 camera frames -> model pixels, as Isaac-GR00T's eval image transform and the Qwen2-VL
image processor (gr00t/model/gr00t_n1d7/image_augmentations.py at 626af89).

processor_config.json chooses one of two transforms; both start by letterboxing (black bars centred
to a square: top = (side - h) // 2, at 626af89 always, whatever `letter_box_transform` says):

    use_albumentations true (the published checkpoints):
        letterbox -> shortest edge to M (OpenCV INTER_AREA) -> centre crop of int(M f) (offset
        (M - c) // 2, f = crop_fraction, else crop / target) -> shortest edge to M again (INTER_AREA)
        M = shortest_image_edge, else image_target_size[0]
    use_albumentations false (torchvision):
        letterbox -> resize to image_target_size (bilinear, antialias, on uint8) -> centre crop to
        image_crop_size (top = round((h - c) / 2)) -> resize to image_target_size

then the backbone's image processor (preprocessor_config.json): x * rescale_factor, (x - mean) / std,
in float32. Its smart resize to multiples of patch x merge must leave the side as it is (the policy
refuses a configuration where it would not).

OpenCV's INTER_AREA is reproduced exactly in numpy (tests/fixtures/groot17 records OpenCV 4.11's
output; no OpenCV dependency): shrinking by a whole factor averages the k x k cells (2 x 2 rounds
halves up, as OpenCV's vector path; other factors round half to even); shrinking by another factor
weighs each source pixel by the area it covers, in float32, summed row by row in OpenCV's order;
enlarging interpolates linearly with OpenCV's "area" coefficients in 11-bit fixed point, rows
combined as its vector path does ((a >> 4) * b >> 16, summed, (s + 2) >> 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_COEF_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE (11 bits)


def letterbox(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (S, S, 3), S = max(H, W): the image centred on black, top / left = pad // 2."""
    h, w = image.shape[:2]
    if h == w:
        return image
    side = max(h, w)
    out = np.zeros((side, side, image.shape[2]), image.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = image
    return out


# ---- OpenCV INTER_AREA ------------------------------------------------------------------------


def _area_weights(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """For each output index, the source indices it covers and their float32 weights, in OpenCV's
    order (computeResizeAreaTab), padded with weight 0: (dst, k) each."""
    scale = src / dst
    rows: list[list[tuple[int, np.float32]]] = []
    for d in range(dst):
        start = d * scale
        end = start + scale
        cell = min(scale, src - start)
        first, last = math.ceil(start), min(math.floor(end), src - 1)
        first = min(first, last)
        row = []
        if first - start > 1e-3:
            row.append((first - 1, np.float32((first - start) / cell)))
        row += [(s, np.float32(1.0 / cell)) for s in range(first, last)]
        if end - last > 1e-3:
            row.append((last, np.float32(min(min(end - last, 1.0), cell) / cell)))
        rows.append(row)
    width = max(len(r) for r in rows)
    index = np.zeros((dst, width), np.int64)
    weight = np.zeros((dst, width), np.float32)
    for d, row in enumerate(rows):
        for k, (s, w) in enumerate(row):
            index[d, k], weight[d, k] = s, w
    return index, weight


def _shrink_by_area(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV's ResizeArea for a non-integer shrink: float32 sums, rounded half to even."""
    x_index, x_weight = _area_weights(image.shape[1], width)
    y_index, y_weight = _area_weights(image.shape[0], height)
    src = image.astype(np.float32)
    rows = np.zeros((image.shape[0], width, image.shape[2]), np.float32)
    for k in range(x_index.shape[1]):  # each source column in turn: OpenCV's summation order
        rows = rows + src[:, x_index[:, k], :] * x_weight[:, k][None, :, None]
    out = rows[y_index[:, 0]] * y_weight[:, 0][:, None, None]
    for k in range(1, y_index.shape[1]):
        out = out + rows[y_index[:, k]] * y_weight[:, k][:, None, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _shrink_by_factor(image: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """OpenCV's resizeAreaFast: the mean of each fy x fx cell."""
    h, w, c = image.shape
    cells = image.astype(np.int64).reshape(h // fy, fy, w // fx, fx, c).sum(axis=(1, 3))
    if (fy, fx) == (2, 2):
        return ((cells + 2) >> 2).astype(np.uint8)  # the vector path: halves round up
    scale = np.float32(1.0) / np.float32(fy * fx)
    return np.clip(np.rint(cells.astype(np.float32) * scale), 0, 255).astype(np.uint8)


def _linear_coefficients(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, int]:
    """OpenCV's area-mode linear coefficients: source index, (1 - f, f) in 11-bit fixed point, and
    the first output index that copies its source pixel (the edge)."""
    inverse = dst / src
    scale = 1.0 / inverse
    index = np.zeros(dst, np.int64)
    alpha = np.zeros((dst, 2), np.int64)
    edge = dst
    for d in range(dst):
        s = math.floor(d * scale)
        f = np.float32((d + 1) - (s + 1) * inverse)
        f = np.float32(0.0) if f <= 0 else np.float32(f - math.floor(f))
        if s + 1 >= src:
            edge = min(edge, d)
            f, s = np.float32(0.0), src - 1
        index[d] = s
        alpha[d] = (
            np.rint((np.float32(1.0) - f) * np.float32(_COEF_SCALE)),
            np.rint(f * np.float32(_COEF_SCALE)),
        )
    return index, alpha, edge


def _enlarge(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV's INTER_AREA when a side grows: linear interpolation with area coefficients."""
    h, w, _ = image.shape
    x_index, x_alpha, x_edge = _linear_coefficients(w, width)
    y_index, y_alpha, _ = _linear_coefficients(h, height)
    src = image.astype(np.int64)
    rows = (
        src[:, x_index] * x_alpha[None, :, 0, None]
        + src[:, np.minimum(x_index + 1, w - 1)] * x_alpha[None, :, 1, None]
    )
    rows[:, x_edge:] = src[:, x_index[x_edge:]] * _COEF_SCALE
    top = rows[np.clip(y_index, 0, h - 1)] >> 4
    bottom = rows[np.clip(y_index + 1, 0, h - 1)] >> 4
    total = ((top * y_alpha[:, 0, None, None]) >> 16) + ((bottom * y_alpha[:, 1, None, None]) >> 16)
    return np.clip((total + 2) >> 2, 0, 255).astype(np.uint8)


def resize_area(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA) for (H, W, C) uint8."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    sy, sx = h / height, w / width
    if sx >= 1 and sy >= 1:
        if sx.is_integer() and sy.is_integer():
            return _shrink_by_factor(image, int(sy), int(sx))
        return _shrink_by_area(image, height, width)
    return _enlarge(image, height, width)


def shortest_edge(image: np.ndarray, size: int) -> np.ndarray:
    """albumentations' SmallestMaxSize(size, INTER_AREA): the shorter side to `size`."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    if scale == 1.0:
        return image
    return resize_area(image, round(h * scale), round(w * scale))


# ---- torchvision (use_albumentations false) -----------------------------------------------------


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision's Resize on a uint8 image (bilinear, antialias): torch's uint8 kernel."""
    if image.shape[:2] == (height, width):
        return image
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    y = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return y[0].permute(1, 2, 0).numpy()


# ---- the pipeline ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTransform:
    """processor_config.json's eval image transform + the backbone's image processor."""

    albumentations: bool
    side: int  # the output side: M (albumentations) or image_target_size
    crop_fraction: float  # albumentations
    crop: tuple[int, int]  # torchvision: image_crop_size (height, width)
    rescale: float  # preprocessor_config.json rescale_factor
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def frame(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (side, side, 3) uint8: upstream's eval transform."""
        x = letterbox(image)
        if self.albumentations:
            x = shortest_edge(x, self.side)
            crop = max(1, int(self.side * self.crop_fraction))
            top = (x.shape[0] - crop) // 2
            left = (x.shape[1] - crop) // 2
            x = x[top : top + crop, left : left + crop]
            return shortest_edge(x, self.side)
        x = resize_bilinear(x, self.side, self.side)
        ch, cw = self.crop
        top, left = round((x.shape[0] - ch) / 2.0), round((x.shape[1] - cw) / 2.0)
        return resize_bilinear(x[top : top + ch, left : left + cw], self.side, self.side)

    def pixels(self, image: np.ndarray) -> np.ndarray:
        """(side, side, 3) uint8 -> (3, side, side) float32, as the image processor (rescale in
        float64 then float32, as transformers' rescale; normalise in float32)."""
        scaled = (image.astype(np.float64) * self.rescale).astype(np.float32)
        x = (scaled - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.pixels(self.frame(image))
