"""Render the sample observation the README's quick start sends: one real MetaWorld camera frame
and the robot state that goes with it, as the simulated robot (`vla-inference sim`) sends them.

    MUJOCO_GL=egl .venv/bin/python scripts/render_sample.py      # needs `make sim-install`

writes examples/metaworld/frame.jpg (the corner camera, 96 x 96, JPEG quality 90: what the sim
client encodes) and examples/metaworld/state.json (the 21 state values at the start of the episode,
in the order of GetModelInfo's state_layouts, rounded to 6 decimals). The episode: reach-v3,
seed 1000, a held-out seed (the demonstrations used seeds 0-999). MuJoCo renders the same frame
bit for bit only on the same renderer, so a re-render may differ in a few pixels.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

TASK = "reach-v3"
SEED = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", default="examples/metaworld", help="folder to write into")
    args = parser.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    from vla_inference.preprocessing.images import encode_jpeg
    from vla_inference.sim import tasks as mt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with mt.MetaWorldEpisode(TASK) as episode:
        state = episode.reset(SEED)
        frame = episode.render()
    (out / "frame.jpg").write_bytes(encode_jpeg(frame))
    values = [round(float(v), 6) + 0.0 for v in state]  # + 0.0: no "-0.0"
    (out / "state.json").write_text(json.dumps(values) + "\n")
    size = f"{frame.shape[1]}x{frame.shape[0]}"
    print(f"{TASK} seed {SEED}: {out / 'frame.jpg'} ({size}), {out / 'state.json'}")
    print(f"instruction: {mt.TASKS[TASK].instruction!r}")


if __name__ == "__main__":
    main()
