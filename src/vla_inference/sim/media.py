"""What a person watches after a simulated run: an animated GIF of the frames the robot sent, and
a PNG plot of the actions it executed over time with chunk boundaries marked. Pillow only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vla_inference.sim import tasks as mt

_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))


def write_gif(frames: Sequence[np.ndarray], path: Path, *, scale: int = 3, fps: float = 10.0) -> Path:
    """frames (H, W, 3) uint8 -> an animated GIF, each frame enlarged `scale` times."""
    images = [
        Image.fromarray(frame).resize(
            (frame.shape[1] * scale, frame.shape[0] * scale), Image.Resampling.NEAREST
        )
        for frame in frames
    ]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def plot_actions(
    actions: Sequence[Sequence[float]],
    chunk_starts: Sequence[int],
    path: Path,
    *,
    title: str = "",
    names: Sequence[str] = mt.ACTION_LAYOUT,
) -> Path:
    """One panel per action dimension over the episode's steps; grey lines where a chunk starts."""
    data = np.asarray(actions, np.float64).reshape(len(actions), -1)
    steps, dims = data.shape
    width, panel, margin = 900, 120, 40
    height = margin + dims * panel + 10
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title or "executed actions; grey: first action of a new chunk", fill="black")
    x0, x1 = 70, width - 20

    def x_at(step: float) -> float:
        return x0 + (x1 - x0) * step / max(1, steps - 1)

    for d in range(dims):
        top = margin + d * panel
        y0, y1 = top + 8, top + panel - 8
        lo, hi = min(-1.0, float(data[:, d].min())), max(1.0, float(data[:, d].max()))

        def y_at(value: float, lo: float = lo, hi: float = hi, y0: float = y0, y1: float = y1) -> float:
            return y1 - (y1 - y0) * (value - lo) / (hi - lo)

        draw.rectangle((x0, y0, x1, y1), outline=(180, 180, 180))
        for start in chunk_starts:
            draw.line((x_at(start), y0, x_at(start), y1), fill=(215, 215, 215))
        draw.line((x0, y_at(0.0), x1, y_at(0.0)), fill=(235, 235, 235))
        label = names[d] if d < len(names) else f"dim {d}"
        draw.text((5, (y0 + y1) / 2 - 6), label[:10], fill="black")
        points = [(x_at(t), y_at(float(v))) for t, v in enumerate(data[:, d])]
        if len(points) > 1:
            draw.line(points, fill=_COLOURS[d % len(_COLOURS)], width=2)
    draw.text((x0, height - 12), f"0 .. {steps - 1} steps", fill="black")
    image.save(path)
    return path
