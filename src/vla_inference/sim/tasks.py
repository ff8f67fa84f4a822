"""MetaWorld MT10 as the simulated robot sees it: tasks, instructions, seeding, state and camera.

One episode = one task and one integer seed. The seed fixes the random initial configuration
(object and goal positions) through the environment's own generator, so an episode replays
exactly; training demonstrations and evaluation use disjoint seed ranges (TRAIN_SEEDS, EVAL_SEEDS).

What the policy is given (the robot's "state", sent as Observation.joint_positions, 21 numbers):

    index  meaning                                         units
    0:3    end-effector (hand) position x, y, z            metres, world frame
    3      gripper opening                                 0 closed .. 1 open
    4:7    first object position                           metres
    7:11   first object orientation (quaternion, as MetaWorld reports it)
    11:14  second object position (zeros when none)        metres
    14:18  second object orientation (zeros when none)
    18:21  goal position                                   metres

That is MetaWorld's own fully observable observation without its previous-frame copy: object
and goal coordinates come from the simulator's observation, not from the image. The camera
frame (the "corner" camera, upright, shadows and reflections off so that software rendering
costs ~15 ms instead of ~110 ms) is sent beside it. Actions are MetaWorld's: end-effector
delta x, y, z and gripper effort, each in [-1, 1].
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

STATE_DIM = 21
ACTION_DIM = 4
EMBODIMENT = "metaworld_sawyer"
CAMERA = "corner"
DEFAULT_IMAGE_SIZE = 96
DEFAULT_MAX_STEPS = 300
# The demonstrator of the embedded default: MetaWorld's scripted expert with its end-effector
# command rate-limited to this much change per step (Euclidean, over delta x, y, z). The scripted
# experts are bang-bang-like (their commands saturate and reverse in one step); a robot's
# commands are smooth, and real-time chunking's smoothing shows only on a smooth policy.
SMOOTH_EXPERT_MAX_STEP = 0.25

# Seed ranges: demonstrations are recorded from TRAIN_SEEDS; evaluation starts at 1000.
TRAIN_SEEDS = range(0, 1000)
EVAL_SEEDS = range(1000, 2000)

STATE_LAYOUT = (
    "hand_x",
    "hand_y",
    "hand_z",
    "gripper_opening",
    "object1_x",
    "object1_y",
    "object1_z",
    "object1_q0",
    "object1_q1",
    "object1_q2",
    "object1_q3",
    "object2_x",
    "object2_y",
    "object2_z",
    "object2_q0",
    "object2_q1",
    "object2_q2",
    "object2_q3",
    "goal_x",
    "goal_y",
    "goal_z",
)
ACTION_LAYOUT = ("delta_x", "delta_y", "delta_z", "gripper_effort")


@dataclass(frozen=True)
class Task:
    name: str  # MetaWorld environment name
    instructions: tuple[str, ...]  # natural paraphrases; the first is the canonical one

    @property
    def instruction(self) -> str:
        return self.instructions[0]


MT10: tuple[Task, ...] = (
    Task("reach-v3", ("reach the goal", "move the gripper to the target", "reach for the target point")),
    Task(
        "push-v3", ("push the puck to the goal", "slide the puck to the target", "push the block to the goal")
    ),
    Task(
        "pick-place-v3",
        (
            "pick up the puck and place it at the goal",
            "pick and place the puck",
            "lift the puck to the target",
        ),
    ),
    Task("door-open-v3", ("open the door", "pull the door open", "swing the door open")),
    Task("drawer-open-v3", ("open the drawer", "pull the drawer open", "slide the drawer out")),
    Task("drawer-close-v3", ("close the drawer", "push the drawer shut", "slide the drawer closed")),
    Task(
        "button-press-topdown-v3",
        ("press the button", "push the button down from above", "press down on the button"),
    ),
    Task(
        "peg-insert-side-v3",
        (
            "insert the peg into the hole",
            "put the peg in the hole from the side",
            "slide the peg into the hole",
        ),
    ),
    Task("window-open-v3", ("open the window", "slide the window open", "push the window open")),
    Task("window-close-v3", ("close the window", "slide the window shut", "push the window closed")),
)
TASKS: dict[str, Task] = {task.name: task for task in MT10}

# The "wrong instruction" baseline: each task is given the canonical instruction of this other
# task, chosen where possible from a task that shares the scene, so only language tells them apart.
CONFUSED_WITH: dict[str, str] = {
    "reach-v3": "push-v3",
    "push-v3": "pick-place-v3",
    "pick-place-v3": "reach-v3",
    "door-open-v3": "button-press-topdown-v3",
    "drawer-open-v3": "drawer-close-v3",
    "drawer-close-v3": "drawer-open-v3",
    "button-press-topdown-v3": "door-open-v3",
    "peg-insert-side-v3": "pick-place-v3",
    "window-open-v3": "window-close-v3",
    "window-close-v3": "window-open-v3",
}


def task(name: str) -> Task:
    try:
        return TASKS[name if name.endswith("-v3") else f"{name}-v3"]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; MT10 tasks: {', '.join(TASKS)}") from None


def parse_tasks(spec: str) -> list[Task]:
    """'reach-v3,drawer-open' or 'mt10' -> tasks."""
    if spec.strip().lower() in ("", "mt10", "all"):
        return list(MT10)
    return [task(name.strip()) for name in spec.split(",") if name.strip()]


def observation_to_state(obs: np.ndarray) -> np.ndarray:
    """MetaWorld's 39-number observation -> the 21-number robot state (see the module docstring)."""
    return np.concatenate([obs[:18], obs[36:39]]).astype(np.float32)


def limit_step(previous: np.ndarray, target: np.ndarray, max_step: float) -> np.ndarray:
    """`target`, moved back toward `previous` so that it is at most `max_step` away (Euclidean)."""
    delta = target - previous
    norm = float(np.linalg.norm(delta))
    return target if norm <= max_step else previous + delta * (max_step / norm)


class MetaWorldEpisode:
    """One MetaWorld environment for one task, reseeded per episode, with a cheap camera."""

    def __init__(
        self,
        task_name: str,
        image_size: int = DEFAULT_IMAGE_SIZE,
        max_steps: int = DEFAULT_MAX_STEPS,
        expert_max_step: float = 0.0,
    ):
        """`expert_max_step` > 0 rate-limits `expert_action`'s motion (see SMOOTH_EXPERT_MAX_STEP);
        0 is MetaWorld's expert as it is."""
        os.environ.setdefault("MUJOCO_GL", "egl")
        import metaworld  # noqa: F401  (registers the environments)
        import mujoco
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        from metaworld.policies import ENV_POLICY_MAP

        self.task = task(task_name)
        self.max_steps = max_steps
        env = ALL_V3_ENVIRONMENTS[self.task.name]()
        # What MetaWorld's own benchmark construction does, minus its fixed list of 50 goals:
        # every reset draws a fresh configuration from the environment's seeded generator.
        env._set_task_called = True
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env.__dict__.pop("sawyer_observation_space", None)
        env._partially_observable = False
        self.env: Any = env
        expert_class: Any = ENV_POLICY_MAP[self.task.name]  # typed as the abstract base Policy
        self.expert = expert_class()
        self.expert_max_step = expert_max_step
        self._expert_last: np.ndarray | None = None
        env.model.vis.quality.offsamples = 0
        self._renderer = mujoco.Renderer(env.model, image_size, image_size)
        self._mujoco = mujoco
        self.obs = np.zeros(39)
        self.steps = 0
        self.success = False

    def reset(self, seed: int) -> np.ndarray:
        """Start the episode of this seed; returns the robot state."""
        self.env.seed(int(seed))
        self.obs, _ = self.env.reset()
        self.steps = 0
        self.success = False
        self._expert_last = None
        return self.state

    @property
    def state(self) -> np.ndarray:
        return observation_to_state(self.obs)

    def expert_action(self) -> np.ndarray:
        """The scripted expert's next action, clipped to [-1, 1]; with `expert_max_step`, its xyz
        part moves at most that far (Euclidean) from the expert's previous action."""
        action = np.clip(np.asarray(self.expert.get_action(self.obs), np.float32), -1.0, 1.0)
        if self.expert_max_step > 0 and self._expert_last is not None:
            action[:3] = limit_step(self._expert_last[:3], action[:3], self.expert_max_step)
        self._expert_last = action
        return action.copy()

    def step(self, action: np.ndarray) -> bool:
        """Apply one 4-dim action; returns True once the task has succeeded in this episode."""
        self.obs, _, _, _, info = self.env.step(np.clip(np.asarray(action, np.float64), -1.0, 1.0))
        self.steps += 1
        self.success = self.success or bool(info["success"])
        return self.success

    @property
    def done(self) -> bool:
        return self.success or self.steps >= self.max_steps

    def render(self) -> np.ndarray:
        """The corner camera, upright: (S, S, 3) uint8."""
        flags = self._mujoco.mjtRndFlag
        self._renderer.update_scene(self.env.data, camera=CAMERA)
        self._renderer.scene.flags[flags.mjRND_SHADOW] = 0
        self._renderer.scene.flags[flags.mjRND_REFLECTION] = 0
        return np.ascontiguousarray(self._renderer.render()[::-1])

    def close(self) -> None:
        self._renderer.close()
        self.env.close()

    def __enter__(self) -> MetaWorldEpisode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
