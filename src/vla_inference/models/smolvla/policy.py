"""SmolVLAPolicy: LeRobot's SmolVLA checkpoints (lerobot/smolvla_base and its fine-tunes) behind the
VLAModel contract, with LeRobot's preprocessing (v0.4.4, the commit the parity fixture pins).

Cameras. The checkpoint's VISUAL features (config.json order, LeRobot's `empty_camera_*` fillers
left out) are its cameras: each is named in the server's camera vocabulary (steps.camera_roles on
the feature name without "observation.images." / "observation.": a wrist or hand camera is
left_wrist / right_wrist, the first other one base, the rest keep their own name) and is also
taken under its short and its full feature name ("camera1", "observation.images.camera1").
A camera that is not sent is a masked slot, as LeRobot's `empty_cameras` fillers are: its tokens
are padding that moves no position, so any non-empty subset of the cameras is served exactly as
LeRobot serves it. At least one camera is required; an unknown name is refused.

Preprocessing (prepare, CPU), as LeRobot's SmolVLA:
    images   uint8 / 255 -> bilinear resize keeping the aspect ratio to fit the tower's square
             (torch, align_corners=False, sizes truncated to int), zero padding on the LEFT and
             TOP (openpi centres), then x * 2 - 1 (the padding is -1)
    state    the normaliser step's statistics (LeRobot's convention: float32, MEAN_STD as
             (x - mean) / (std + eps)), zero-padded to max_state_dim
    prompt   the instruction + "\\n" (unless it ends with one), SmolVLM2's tokenizer, truncated to
             and (pad_language_to "max_length") right-padded to tokenizer_max_length
After the model: the first action_dim values, un-normalised (x * std + mean), the first
min(VLA_CHUNK_SIZE, chunk_size) actions.

Statistics: the checkpoint's own; a checkpoint that keeps them only per training dataset (the
migrated base checkpoint) is served with the dataset VLA_NORM_STATS_KEY names, and refused at start
without one (LeRobot would silently return normalised actions); so is a checkpoint without them.
The one embodiment is "default", or the dataset key.

VLA_COMPILE: batches run through static.SmolVLAStatic (every camera slot, the prompt padded to
tokenizer_max_length; compiled per batch bucket by the engine's warm-up). Batches with a
real-time-chunking row guided with the Jacobian run eagerly (models/policy.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vla_inference.models import base, rtc
from vla_inference.models.common import flow
from vla_inference.models.policy import FlowPolicy, Loaded
from vla_inference.models.smolvla import checkpoint as ckpt
from vla_inference.models.smolvla.model import SmolVLABatch, SmolVLAConfig, SmolVLAModel
from vla_inference.models.smolvla.static import SmolVLAStatic
from vla_inference.preprocessing.steps import ActionOutput, CameraMap, CameraSlot, StateInput, camera_roles

CONTENTS = (
    'config.json with "type": "smolvla", model.safetensors, policy_preprocessor.json and '
    "policy_postprocessor.json with their statistics; SmolVLM2's tokenizer.json there or at "
    "VLA_TOKENIZER_PATH"
)


@dataclass(frozen=True)
class SmolVLAInputs:
    """One prepared sample (a row of SmolVLABatch, as numpy)."""

    images: np.ndarray  # (N, 3, S, S) float32 in [-1, 1]; -1 where the camera is missing
    image_masks: np.ndarray  # (N,) bool
    tokens: np.ndarray  # (T,) int64, right-padded with the padding token
    token_mask: np.ndarray  # (T,) bool, real tokens first
    state: np.ndarray  # (max_state_dim,) float32, normalised and padded


@dataclass
class SmolVLALoaded(Loaded[SmolVLAModel]):
    checkpoint: ckpt.Checkpoint
    tokenizer: Any  # tokenizers.Tokenizer
    pad_id: int
    cameras: CameraMap  # the checkpoint's cameras, in slot order
    state: StateInput
    output: ActionOutput
    num_steps: int


def camera_name(feature: str) -> str:
    """A camera feature's short name: "observation.images.camera1" -> "camera1",
    "observation.image" -> "image"."""
    return feature.removeprefix("observation.images.").removeprefix("observation.").lower()


def image_to_model_input(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, size, size) float32 in [-1, 1], as LeRobot's SmolVLA prepares
    images: / 255, bilinear resize (align_corners=False) keeping the aspect ratio to fit the square,
    zero padding on the left and top, then x * 2 - 1."""
    pixels = np.require(image, requirements=["C", "W"])  # decoded frames may be read-only buffers
    img = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0
    height, width = img.shape[2:]
    if (height, width) != (size, size):
        ratio = max(width / size, height / size)
        rows, cols = int(height / ratio), int(width / ratio)
        img = F.interpolate(img, size=(rows, cols), mode="bilinear", align_corners=False)
        img = F.pad(img, (size - cols, 0, size - rows, 0), value=0.0)
    return (img[0] * 2.0 - 1.0).numpy()


class SmolVLAPolicy(FlowPolicy[SmolVLALoaded, SmolVLABatch]):
    model_type = "smolvla"
    compiled_name = "SmolVLA sampler"

    # ---- loading -----------------------------------------------------------------------------

    def load_checkpoint(self, path: str | None) -> SmolVLALoaded:
        where = base.checkpoint_dir(path, "SmolVLA", CONTENTS)
        loaded = ckpt.load(where, tokenizer_path=self.settings.tokenizer_path)
        cfg, features = loaded.config, loaded.features
        dataset = self.settings.norm_stats_key.strip()
        state_norm, action_norm = loaded.normalizers(dataset)
        if self.settings.action_dim_set and self.settings.action_dim != features.action_dim:
            raise base.ModelLoadError(
                f"VLA_ACTION_DIM={self.settings.action_dim} but {where / 'config.json'} says the action "
                f"has {features.action_dim} values"
            )
        tokenizer, pad_id = ckpt.load_tokenizer(loaded.tokenizer, cfg.vocab_size)
        network = loaded.load_network(self.device, self.dtype)
        shorts = [camera_name(feature) for feature in features.cameras]
        roles = camera_roles(shorts)
        cameras = CameraMap(
            tuple(
                CameraSlot(role, aliases=(short, feature))
                for role, short, feature in zip(roles, shorts, features.cameras, strict=True)
            ),
            model="this SmolVLA checkpoint",
        )
        embodiment = dataset or "default"
        chunk_size = min(self.settings.chunk_size, cfg.chunk_size)
        num_steps = self.settings.num_denoise_steps or cfg.num_steps
        size = cfg.vision.image_size
        description = base.ModelDescription(
            name=f"smolvla {where.name}",
            version=hashlib.sha256(f"{where.resolve()}|{cfg}|{dataset}".encode()).hexdigest()[:12],
            family="smolvla",
            action_dim=features.action_dim,
            chunk_size=chunk_size,
            horizon=cfg.chunk_size,
            embodiments=(embodiment,),
            default_embodiment=embodiment,
            state_dims={embodiment: features.state_dim},
            camera_names=tuple(roles),
            image_size=(size, size),
            decode_size=(size, size),  # every frame is resized to fit the square first
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            confidence_definition=flow.CONFIDENCE_DEFINITION,
            description=describe(loaded, roles, dataset, num_steps),
            state_layouts={embodiment: features.state_names} if features.state_names else {},
            action_layouts={embodiment: features.action_names} if features.action_names else {},
            rtc_methods=rtc.FLOW_METHODS,
        )
        return SmolVLALoaded(
            network=network,
            description=description,
            checkpoint=loaded,
            tokenizer=tokenizer,
            pad_id=pad_id,
            cameras=cameras,
            state=StateInput(state_norm, cfg.max_state_dim),
            output=ActionOutput(action_norm, chunk_size, features.action_dim, cfg.max_action_dim),
            num_steps=num_steps,
        )

    def static_runner(self, loaded: SmolVLALoaded) -> SmolVLAStatic:
        """Static shapes over every camera slot of the checkpoint."""
        return SmolVLAStatic(
            loaded.network, slots=range(len(loaded.cameras.slots)), backend=self.settings.compile_backend
        )

    @property
    def config(self) -> SmolVLAConfig:
        return self.loaded.network.cfg

    def num_steps(self) -> int:
        return self.loaded.num_steps

    def noise_shape(self) -> tuple[int, int]:
        return self.config.chunk_size, self.config.max_action_dim

    def fits_static(self, batch: SmolVLABatch) -> bool:
        return isinstance(self.static, SmolVLAStatic) and self.static.fits(batch)

    # ---- prepare: cameras -> images -> state -> prompt -----------------------------------------

    def prepare(self, observation: base.Observation) -> base.PreparedSample:
        loaded, cfg = self.loaded, self.config
        embodiment = self.resolve_embodiment(observation.embodiment)
        self.check_joints(observation, embodiment)
        size = cfg.vision.image_size
        frames = loaded.cameras(observation.images)
        images = np.full((len(frames), 3, size, size), -1.0, np.float32)  # LeRobot's filler value
        for slot, frame in enumerate(frames):
            if frame is not None:
                images[slot] = image_to_model_input(frame, size)
        spec = loaded.checkpoint.tokenizer
        tokens, token_mask = ckpt.tokenize_prompt(
            loaded.tokenizer,
            loaded.pad_id,
            observation.instruction,
            spec.max_length,
            spec.padding,
            spec.truncation,
        )
        inputs = SmolVLAInputs(
            images=images,
            image_masks=np.array([frame is not None for frame in frames]),
            tokens=tokens,
            token_mask=token_mask,
            state=loaded.state(observation.joint_positions),
        )
        return base.PreparedSample(inputs, embodiment, base.sample_seed(observation), batch_key=("smolvla",))

    # ---- forward -----------------------------------------------------------------------------

    def collate(self, samples: Sequence[base.PreparedSample]) -> SmolVLABatch:
        """The samples as one batch; the prompts cut to the longest real prompt of the batch
        (trailing padding never changes a real token's value: positions count real tokens only)."""
        inputs: list[SmolVLAInputs] = [s.inputs for s in samples]
        used = max(int(i.token_mask.sum()) for i in inputs)
        tokens = np.full((len(inputs), used), self.loaded.pad_id, np.int64)
        masks = np.zeros((len(inputs), used), bool)
        for row, i in enumerate(inputs):
            n = min(used, i.tokens.shape[0])
            tokens[row, :n], masks[row, :n] = i.tokens[:n], i.token_mask[:n]

        def stack(rows: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.stack(rows)).to(device=self.device, dtype=dtype)

        return SmolVLABatch(
            images=stack([i.images for i in inputs], self.dtype),
            image_masks=stack([i.image_masks for i in inputs], torch.bool),
            tokens=torch.from_numpy(tokens).to(self.device),
            token_masks=torch.from_numpy(masks).to(self.device),
            state=stack([i.state for i in inputs], torch.float32),
        )

    # ---- postprocess -------------------------------------------------------------------------

    def postprocess(self, actions: np.ndarray, sample: base.PreparedSample) -> np.ndarray:
        return self.loaded.output(actions)

    def normalize_actions(self, actions: np.ndarray, embodiment: str) -> np.ndarray:
        return self.loaded.output.to_model(actions)


def describe(loaded: ckpt.Checkpoint, roles: Sequence[str], dataset: str, num_steps: int) -> str:
    """ModelInfo.description: what is served and how a robot feeds it."""
    cfg, features = loaded.config, loaded.features
    cameras = ", ".join(f"{role} ({feature})" for role, feature in zip(roles, features.cameras, strict=True))
    statistics = f"the statistics of dataset {dataset!r}" if dataset else "the checkpoint's statistics"
    executes = f"; LeRobot executes {features.n_action_steps} per chunk" if features.n_action_steps else ""
    return (
        f"SmolVLA (LeRobot format): SmolVLM2 vision tower at {cfg.vision.image_size} px, the first "
        f"{cfg.vlm.depth} text layers, a {cfg.expert.width}-wide action expert; {cfg.chunk_size} actions "
        f"per chunk from {num_steps} flow steps{executes}. Cameras: {cameras}; missing ones are masked, "
        f"at least one is needed; any size is resized with padding. State {features.state_dim} and "
        f"action {features.action_dim} values, normalised with {statistics}."
    )


__all__ = ["SmolVLAPolicy", "camera_name", "image_to_model_input"]
