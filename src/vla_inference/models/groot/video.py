"""GR00T N1.5 camera frames -> model pixels, as upstream's eval transforms and Eagle processor.

    frame (H, W, 3) uint8
    -> float / 255, channels first                                   (VideoToTensor)
    -> [server only] bilinear resize with antialias to the metadata resolution of that camera
       when the frame has another size (upstream asserts the size instead)
    -> centre crop to int(scale H) x int(scale W), top / left = round((H - h) / 2),
       round((W - w) / 2) with Python's round                         (VideoCrop, eval)
    -> bilinear resize with antialias, align_corners False, to S x S  (VideoResize, on float)
    -> (x * 255).to(uint8): truncation, not rounding                  (VideoToNumpy)
    -> (x / 255 - 0.5) / 0.5                                           (Eagle image processor)

S is the model's image size (224 for N1.5, the data configs' resize target). A resize to the size
the image already has is skipped, as torchvision does. Colour jitter and noise are training-only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize_float(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, height, width): bilinear, antialias, half-pixel centres."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def crop_box(height: int, width: int, scale: float) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of upstream's eval centre crop."""
    crop_h, crop_w = int(height * scale), int(width * scale)
    return round((height - crop_h) / 2.0), round((width - crop_w) / 2.0), crop_h, crop_w  # Python's round


def frame_to_pixels(
    frame: np.ndarray,
    size: int,
    resolution: tuple[int, int] | None = None,
    crop_scale: float | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, size, size) float32 in [-1, 1].

    resolution: (width, height) the camera had in training (metadata.json); None = the frame's own.
    """
    x = torch.from_numpy(np.ascontiguousarray(frame, dtype=np.uint8)).permute(2, 0, 1)[None]
    x = x.to(torch.float32) / 255.0
    if resolution is not None:
        x = resize_float(x, resolution[1], resolution[0])
    if crop_scale is not None:
        top, left, h, w = crop_box(x.shape[-2], x.shape[-1], crop_scale)
        x = x[..., top : top + h, left : left + w]
    x = resize_float(x, size, size)
    u8 = (x * 255).to(torch.uint8)
    pixels = (u8.to(torch.float32) / 255.0 - 0.5) / 0.5
    return pixels[0].numpy()
