"""What a person watches after a simulated run: an animated GIF of the frames the robot sent, and
a PNG plot of the actions it executed over time with chunk boundaries marked. Pillow only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vla_inference.sim import tasks as mt

_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))


def write_gif(
    frames: Sequence[np.ndarray], path: Path, *, scale: int = 3, fps: float = 10.0, caption: str = ""
) -> Path:
    """frames (H, W, 3) uint8 -> an animated GIF, each frame enlarged `scale` times; with a caption,
    a band under each frame says `caption` and which request of the episode the frame was sent with."""
    images = []
    for index, frame in enumerate(frames):
        image = Image.fromarray(frame).resize(
            (frame.shape[1] * scale, frame.shape[0] * scale), Image.Resampling.NEAREST
        )
        if caption:
            framed = Image.new("RGB", (image.width, image.height + 16), "white")
            framed.paste(image, (0, 0))
            text = f"{caption}, request {index + 1}/{len(frames)}"
            ImageDraw.Draw(framed).text((3, image.height + 2), text, fill="black")
            image = framed
        images.append(image)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def _ticks(lo: float, hi: float) -> list[float]:
    """lo, hi and 0 when it lies between them: the values labelled on a panel's y axis."""
    ticks = [lo, hi]
    if lo < 0 < hi:
        ticks.append(0.0)
    return ticks


def plot_actions(
    actions: Sequence[Sequence[float]],
    chunk_starts: Sequence[int],
    path: Path,
    *,
    title: str = "",
    names: Sequence[str] = mt.ACTION_LAYOUT,
) -> Path:
    """One panel per action dimension over the episode's steps, each with its full name and a y scale
    (its bounds and 0; at least [-1, 1], the policy's action range); grey lines where a chunk starts;
    the x axis counts control steps."""
    data = np.asarray(actions, np.float64).reshape(len(actions), -1)
    steps, dims = data.shape
    labels = [names[d] if d < len(names) else f"dim {d}" for d in range(dims)]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(int(probe.textlength(label)) for label in labels) if labels else 0
    width, panel, margin = 960, 120, 40
    x0 = 10 + label_width + 10 + 40  # label, gap, tick numbers
    x1 = width - 20
    height = margin + dims * panel + 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title or "executed actions; grey: first action of a new chunk", fill="black")

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
        draw.text((10, (y0 + y1) / 2 - 6), labels[d], fill="black")
        for tick in _ticks(lo, hi):
            y = y_at(tick)
            draw.line((x0 - 4, y, x0, y), fill="black")
            text = f"{tick:.3g}"
            draw.text((x0 - 6 - probe.textlength(text), y - 6), text, fill="black")
        points = [(x_at(t), y_at(float(v))) for t, v in enumerate(data[:, d])]
        if len(points) > 1:
            draw.line(points, fill=_COLOURS[d % len(_COLOURS)], width=2)
    bottom = margin + dims * panel - 8
    for step in sorted({0, steps // 2, max(0, steps - 1)}):
        x = x_at(step)
        draw.line((x, bottom, x, bottom + 4), fill="black")
        draw.text((x - probe.textlength(str(step)) / 2, bottom + 6), str(step), fill="black")
    draw.text((x1 - 90, height - 14), "control step", fill="black")
    image.save(path)
    return path
