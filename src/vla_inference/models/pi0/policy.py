"""Pi0Policy: serves pi0 and pi0.5 checkpoints (openpi PyTorch or LeRobot format) and the embedded demo.

Cameras. pi0 has three image slots; observation camera names map to them as follows:

    observation camera   model slot
    "base"               base_0_rgb
    "left_wrist"         left_wrist_0_rgb
    "right_wrist"        right_wrist_0_rgb

(aliases such as "wrist" for "left_wrist": models/base.py CAMERA_ALIASES, as in the transport.)

A camera that is not sent is a black image with its mask False (the model ignores its tokens).
An unknown camera name is refused (InvalidObservation on "cameras"). A LeRobot checkpoint whose
image features use other slot names takes those names as camera names.

Preprocessing (prepare, CPU): images resized with padding to the tower's size (224) and scaled to
[-1, 1]; the state normalised with the embodiment's statistics (pi0: z-score, pi0.5: quantiles; the
LeRobot format uses its own normaliser settings) and zero-padded to the model's 32 dims; the prompt
tokenised like the reference: pi0 "<instruction>" + "\\n" (BOS first), pi0.5
"Task: <instruction>, State: <256-bin discretised normalised state>;\\nAction: " (the state unpadded,
as openpi; VLA_PI05_PROMPT_STATE=padded discretises it zero-padded to 32 dims, as LeRobot 0.4.0-0.4.4
did). A prompt longer than the model's max_token_len is refused rather than truncated.

Embodiments are the checkpoint's norm-stats asset ids (VLA_NORM_STATS_KEY keeps only one).

The steps (preprocessing/steps.py): cameras (CameraMap) -> images (`image_to_model_input`) ->
state (StateInput: normalise, pad) -> prompt (`tokenize_prompt`); after the model, ActionOutput
(un-normalise, slice to the robot's chunk and action size).

VLA_COMPILE: batches run through static.Pi0Static (static shapes per batch bucket, compiled by the
engine's warm-up for every bucket up to VLA_BATCH_SIZE). Batches with a real-time-chunking row
guided with the Jacobian run eagerly (models/policy.py); guidance with the velocity held constant
(VLA_RTC_GUIDANCE_JACOBIAN=false) runs compiled.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_inference.models import base, rtc
from vla_inference.models.common import flow
from vla_inference.models.common.tokenizers import load_sentencepiece
from vla_inference.models.common.weights import load_weights
from vla_inference.models.pi0 import checkpoint as ckpt
from vla_inference.models.pi0.model import IMAGE_SLOTS, Pi0Batch, Pi0Config, Pi0Model, build
from vla_inference.models.pi0.static import Pi0Static
from vla_inference.models.policy import FlowPolicy, Loaded
from vla_inference.preprocessing.images import resize_with_pad
from vla_inference.preprocessing.steps import ActionOutput, CameraMap, CameraSlot, StateInput, pad_to

log = logging.getLogger(__name__)

CAMERA_TO_SLOT = {"base": "base_0_rgb", "left_wrist": "left_wrist_0_rgb", "right_wrist": "right_wrist_0_rgb"}
SLOT_TO_CAMERA = {slot: camera for camera, slot in CAMERA_TO_SLOT.items()}
PROMPT_CACHE_SIZE = 1024


@dataclass(frozen=True)
class Pi0Inputs:
    """One prepared sample (Pi0Batch's row, as numpy)."""

    images: np.ndarray  # (N, 3, S, S) float32 in [-1, 1]
    image_masks: np.ndarray  # (N,) bool
    tokens: np.ndarray  # (T,) int64, T = max_token_len, valid first
    token_mask: np.ndarray  # (T,) bool
    state: np.ndarray  # (A,) float32, normalised and padded


@dataclass
class Pi0Loaded(Loaded[Pi0Model]):
    checkpoint: ckpt.Checkpoint
    tokenizer: Any
    cameras: CameraMap  # the cameras the checkpoint serves, in slot order
    camera_slots: tuple[int, ...]  # the model's image slot of each of them
    states: dict[str, StateInput]  # embodiment -> state step
    outputs: dict[str, ActionOutput]  # embodiment -> action step
    num_steps: int
    prompts: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # pi0's prompt cache


def discretize_state(state: np.ndarray) -> np.ndarray:
    """openpi's pi0.5 and pi0-FAST rule (LeRobot's too): np.digitize over 256 equal bins of [-1, 1],
    minus one. The state is normalised in the checkpoint's own precision first (LeRobot: float32,
    where a value on a bin edge lands in the bin above; preprocessing/normalize.py).

    Not clipped, as in the reference: values below -1 give -1, values above 1 give 255.
    """
    return np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1


def state_prompt(instruction: str, normalized_state: np.ndarray) -> str:
    """The prompt text of the models that read the state as text (pi0.5, pi0-FAST; openpi and
    LeRobot alike): "Task: <instruction>, State: <256-bin ids>;\\n", the instruction stripped, its
    "_" and newlines as spaces (case kept)."""
    cleaned = instruction.strip().replace("_", " ").replace("\n", " ")
    bins = " ".join(str(int(v)) for v in discretize_state(np.asarray(normalized_state).reshape(-1)))
    return f"Task: {cleaned}, State: {bins};\n"


def image_to_model_input(image: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, size, size) float32 in [-1, 1], resized with padding (into `out`)."""
    resized = resize_with_pad(image, size, size).transpose(2, 0, 1)
    if out is None:
        out = np.empty((3, size, size), np.float32)
    np.divide(resized, 127.5, out=out, dtype=np.float32)
    out -= 1.0
    return out


def tokenize_prompt(
    tokenizer: Any, cfg: Pi0Config, instruction: str, normalized_state: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The reference prompt as (max_token_len,) ids and mask, valid tokens first.

    pi0: BOS + instruction + "\\n"; pi0.5: BOS + "Task: <instruction>, State: <bins>;\\nAction: ".
    A prompt longer than the model's max_token_len is refused, not truncated.
    """
    if cfg.pi05:
        state = normalized_state if normalized_state is not None else np.zeros(0)
        ids = tokenizer.encode(state_prompt(instruction, state) + "Action: ", add_bos=True)
    else:
        cleaned = instruction.strip().replace("_", " ").replace("\n", " ")
        ids = tokenizer.encode(cleaned, add_bos=True) + tokenizer.encode("\n")
    if len(ids) > cfg.max_token_len:
        raise base.InvalidObservation(
            "language_instruction",
            f"the prompt is {len(ids)} tokens; this model takes at most {cfg.max_token_len} "
            "(shorten the instruction)",
        )
    tokens = np.zeros(cfg.max_token_len, np.int64)
    mask = np.zeros(cfg.max_token_len, bool)
    tokens[: len(ids)] = ids
    mask[: len(ids)] = True
    return tokens, mask


class Pi0Policy(FlowPolicy[Pi0Loaded, Pi0Batch]):
    model_type = "pi0"

    # ---- loading -----------------------------------------------------------------------------

    def load_checkpoint(self, path: str | None) -> Pi0Loaded:
        from vla_inference.models.pi0 import demo as demo_module

        embedded = path is None
        demo = embedded and self.settings.embedded_model == "random"
        if demo:
            where = demo_module.ensure_demo_checkpoint()
        elif embedded:
            where = demo_module.METAWORLD_CHECKPOINT
        else:
            where = Path(str(path)).expanduser()
        loaded = ckpt.load(
            where, tokenizer_path=self.settings.tokenizer_path, norm_stats_key=self.settings.norm_stats_key
        )
        cfg = loaded.config
        tokenizer = load_sentencepiece(loaded.tokenizer_path, cfg.vocab_size)
        network = load_weights(
            build(cfg, device="meta"),
            loaded.weight_files,
            loaded.names,
            device=self.device,
            dtype=self.dtype,
            where=str(where / "model.safetensors"),
            what=loaded.describe(),
        )
        assert isinstance(network, Pi0Model)

        action_dim, state_dims = self._dims(loaded)
        embodiments = tuple(sorted(loaded.norms)) or ("default",)
        default = self.settings.norm_stats_key or embodiments[0]
        if not loaded.norms:
            state_dims = {"default": state_dims.get("default", action_dim)}
        cameras = tuple(SLOT_TO_CAMERA.get(slot, slot) for slot in loaded.image_slots)
        trained = loaded.about.cameras  # a checkpoint may say it was trained with fewer cameras
        if trained and not set(trained) <= set(cameras):
            raise base.ModelLoadError(
                f"{where}: config.json names cameras {list(trained)}; the model has {list(cameras)}"
            )
        served = [(i, c) for i, c in enumerate(cameras) if not trained or c in trained]
        num_steps = self.settings.num_denoise_steps or loaded.num_steps or cfg.num_steps
        if demo:
            name = "pi0-demo (random weights, not a trained policy)"
        elif embedded:
            name = "pi0-metaworld-mt10 (trained in MetaWorld simulation, not a real-robot policy)"
        else:
            name = f"{'pi0.5' if cfg.pi05 else 'pi0'} {where.name} ({loaded.format} format)"
        if embedded and not demo:  # the shipped weights themselves (docs/evaluation.md cites it)
            version = hashlib.sha256((where / "model.safetensors").read_bytes()).hexdigest()[:12]
        else:
            version = hashlib.sha256(f"{where.resolve()}|{cfg}".encode()).hexdigest()[:12]
        chunk_size = min(self.settings.chunk_size, cfg.action_horizon)
        description = base.ModelDescription(
            name=name,
            version=version,
            family="pi05" if cfg.pi05 else "pi0",
            action_dim=action_dim,
            chunk_size=chunk_size,
            horizon=cfg.action_horizon,
            embodiments=embodiments,
            default_embodiment=default,
            state_dims=state_dims,
            camera_names=trained or cameras,
            image_size=(cfg.vision.image_size, cfg.vision.image_size),
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            confidence_definition=flow.CONFIDENCE_DEFINITION,
            demo=demo,
            description=loaded.about.description,
            state_layouts=loaded.about.state_layouts,
            action_layouts=loaded.about.action_layouts,
            rtc_methods=rtc.FLOW_METHODS,
            decode_size=(cfg.vision.image_size, cfg.vision.image_size),
        )
        if self.settings.pi05_prompt_state == "padded":
            if cfg.pi05:
                log.info(
                    "pi0.5 prompt: the state is discretised zero-padded to %d dims "
                    "(VLA_PI05_PROMPT_STATE=padded)",
                    cfg.action_dim,
                )
            else:
                log.warning("VLA_PI05_PROMPT_STATE=padded has no effect: pi0 has no state in its prompt")
        norms = {emb: loaded.norms.get(emb) for emb in embodiments}
        return Pi0Loaded(
            network=network,
            description=description,
            checkpoint=loaded,
            tokenizer=tokenizer,
            cameras=CameraMap(tuple(CameraSlot(c) for _, c in served)),
            camera_slots=tuple(i for i, _ in served),
            states={e: StateInput(n.state if n else None, cfg.action_dim) for e, n in norms.items()},
            outputs={
                e: ActionOutput(n.actions if n else None, chunk_size, action_dim, cfg.action_dim)
                for e, n in norms.items()
            },
            num_steps=num_steps,
        )

    def _dims(self, loaded: ckpt.Checkpoint) -> tuple[int, dict[str, int]]:
        cfg = loaded.config
        if loaded.norms:
            sizes = {emb: n.actions.size for emb, n in loaded.norms.items()}
            distinct = set(sizes.values())
            if len(distinct) != 1:
                raise base.ModelLoadError(
                    f"{loaded.path}: the norm stats disagree on the action size ({sizes}); "
                    "choose one set with VLA_NORM_STATS_KEY"
                )
            action_dim = distinct.pop()
            if action_dim == 0:
                action_dim = self.settings.action_dim
            elif self.settings.action_dim_set and self.settings.action_dim != action_dim:
                raise base.ModelLoadError(
                    f"VLA_ACTION_DIM={self.settings.action_dim} but the checkpoint's action statistics have "
                    f"{action_dim} dimensions"
                )
            state_dims = {emb: (n.state.size or action_dim) for emb, n in loaded.norms.items()}
        else:
            action_dim = self.settings.action_dim
            state_dims = {"default": action_dim}
        if action_dim > cfg.action_dim:
            raise base.ModelLoadError(f"action dim {action_dim} exceeds the model's {cfg.action_dim}")
        too_big = {e: d for e, d in state_dims.items() if d > cfg.action_dim}
        if too_big:
            raise base.ModelLoadError(f"state sizes {too_big} exceed the model's {cfg.action_dim}")
        return action_dim, state_dims

    def static_runner(self, loaded: Pi0Loaded) -> Pi0Static:
        """Static shapes over the slots a camera can fill."""
        return Pi0Static(loaded.network, slots=loaded.camera_slots, backend=self.settings.compile_backend)

    @property
    def config(self) -> Pi0Config:
        return self.loaded.network.cfg

    @property
    def model(self) -> Pi0Model:
        return self.loaded.network

    def num_steps(self) -> int:
        return self.loaded.num_steps

    def noise_shape(self) -> tuple[int, int]:
        return self.config.action_horizon, self.config.action_dim

    # ---- prepare: cameras -> images -> state -> prompt ------------------------------------------

    def tokenize(
        self, instruction: str, normalized_state: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        loaded = self.loaded
        if normalized_state is not None:  # pi0.5: the state is in the prompt
            return tokenize_prompt(loaded.tokenizer, self.config, instruction, normalized_state)
        # pi0: a robot repeats its instruction for a whole episode; the arrays are never written.
        cached = loaded.prompts.get(instruction)
        if cached is None:
            cached = tokenize_prompt(loaded.tokenizer, self.config, instruction, None)
            if len(loaded.prompts) >= PROMPT_CACHE_SIZE:
                loaded.prompts.clear()
            loaded.prompts[instruction] = cached
        return cached

    def prepare(self, observation: base.Observation) -> base.PreparedSample:
        loaded, cfg = self.loaded, self.config
        embodiment = self.resolve_embodiment(observation.embodiment)
        self.check_joints(observation, embodiment)
        size = cfg.vision.image_size
        slots = len(loaded.checkpoint.image_slots)
        images = np.zeros((slots, 3, size, size), np.float32)
        masks = np.zeros(slots, bool)
        for slot, image in zip(loaded.camera_slots, loaded.cameras(observation.images), strict=True):
            if image is not None:
                image_to_model_input(image, size, out=images[slot])
                masks[slot] = True
        state_step = loaded.states[embodiment]
        normalized = state_step.normalized(observation.joint_positions)
        state = pad_to(normalized, cfg.action_dim)
        prompt_state = None
        if cfg.pi05:
            # openpi discretises the unpadded state; LeRobot 0.4.0-0.4.4 the state padded to 32 dims.
            prompt_state = state if self.settings.pi05_prompt_state == "padded" else normalized
        tokens, token_mask = self.tokenize(observation.instruction, prompt_state)
        inputs = Pi0Inputs(images, masks, tokens, token_mask, state)
        return base.PreparedSample(inputs, embodiment, base.sample_seed(observation), batch_key=("pi0",))

    # ---- forward -----------------------------------------------------------------------------

    def collate(self, samples: Sequence[base.PreparedSample]) -> Pi0Batch:
        inputs: list[Pi0Inputs] = [s.inputs for s in samples]
        used = max(int(i.token_mask.sum()) for i in inputs)  # trailing padding never influences valid tokens

        def stack(rows: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.stack(rows)).to(device=self.device, dtype=dtype)

        return Pi0Batch(
            images=stack([i.images for i in inputs], self.dtype),
            image_masks=stack([i.image_masks for i in inputs], torch.bool),
            tokens=stack([i.tokens[:used] for i in inputs], torch.long),
            token_masks=stack([i.token_mask[:used] for i in inputs], torch.bool),
            state=stack([i.state for i in inputs], torch.float32),
        )

    # ---- postprocess -------------------------------------------------------------------------

    def postprocess(self, actions: np.ndarray, sample: base.PreparedSample) -> np.ndarray:
        return self.loaded.outputs[sample.embodiment](actions)

    def normalize_actions(self, actions: np.ndarray, embodiment: str) -> np.ndarray:
        return self.loaded.outputs[embodiment].to_model(actions)


__all__ = ["CAMERA_TO_SLOT", "IMAGE_SLOTS", "Pi0Policy"]
