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

VLA_COMPILE: batches run through model.Pi0Static (static shapes per batch bucket, compiled; the
first forward, the engine's warm-up, compiles every bucket up to VLA_BATCH_SIZE). Batches with a
real-time-chunking row guided with the Jacobian run eagerly (it differentiates through the expert);
guidance with the velocity held constant (VLA_RTC_GUIDANCE_JACOBIAN=false) runs compiled.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_inference.models import base, rtc
from vla_inference.models.common import flow, static
from vla_inference.models.common.tokenizers import load_sentencepiece
from vla_inference.models.common.weights import load_weights, resolve_dtype
from vla_inference.models.pi0 import checkpoint as ckpt
from vla_inference.models.pi0.model import IMAGE_SLOTS, Pi0Config, Pi0Model, Pi0Static, build
from vla_inference.preprocessing.images import resize_with_pad

log = logging.getLogger(__name__)

CAMERA_TO_SLOT = {"base": "base_0_rgb", "left_wrist": "left_wrist_0_rgb", "right_wrist": "right_wrist_0_rgb"}
SLOT_TO_CAMERA = {slot: camera for camera, slot in CAMERA_TO_SLOT.items()}
PROMPT_CACHE_SIZE = 1024


@dataclass
class Pi0Inputs:
    images: np.ndarray  # (N, 3, S, S) float32 in [-1, 1]
    image_masks: np.ndarray  # (N,) bool
    tokens: np.ndarray  # (T,) int64, T = max_token_len, valid first
    token_mask: np.ndarray  # (T,) bool
    state: np.ndarray  # (A,) float32, normalised and padded


@dataclass
class Pi0Raw:
    actions: np.ndarray  # (H, A) float32, normalised units
    last_velocity: np.ndarray  # (H, A) float32
    dt: float


def discretize_state(state: np.ndarray) -> np.ndarray:
    """openpi's pi0.5 rule: np.digitize over 256 equal bins of [-1, 1], minus one.

    Not clipped, as in the reference: values below -1 give -1, values above 1 give 255.
    """
    return np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1


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
    cleaned = instruction.strip().replace("_", " ").replace("\n", " ")
    if cfg.pi05:
        state_str = " ".join(
            str(int(v))
            for v in discretize_state(normalized_state if normalized_state is not None else np.zeros(0))
        )
        ids = tokenizer.encode(f"Task: {cleaned}, State: {state_str};\nAction: ", add_bos=True)
    else:
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


class Pi0Policy(base.VLAModel):
    model_type = "pi0"

    def __init__(self, settings: object) -> None:
        super().__init__(settings)
        self._model: Pi0Model | None = None
        self._info: base.ModelDescription | None = None
        self._ckpt: ckpt.Checkpoint | None = None
        self._tokenizer: Any = None
        self._device = torch.device("cpu")
        self._num_steps = 10
        self._prompts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._static: Pi0Static | None = None  # VLA_COMPILE
        self._static_warm = False

    # ---- loading -----------------------------------------------------------------------------

    def load(self, checkpoint_path: str | None, device: str) -> None:
        from vla_inference.models.pi0 import demo as demo_module

        embedded = not checkpoint_path
        demo = embedded and self.settings.embedded_model == "random"
        if demo:
            path = demo_module.ensure_demo_checkpoint()
        elif embedded:
            path = demo_module.METAWORLD_CHECKPOINT
        else:
            path = Path(str(checkpoint_path)).expanduser()
        loaded = ckpt.load(
            path, tokenizer_path=self.settings.tokenizer_path, norm_stats_key=self.settings.norm_stats_key
        )
        cfg = loaded.config
        tokenizer = load_sentencepiece(loaded.tokenizer_path, cfg.vocab_size)
        dtype = resolve_dtype(self.settings.dtype, device)
        model = load_weights(
            build(cfg, device="meta"),
            loaded.weight_files,
            loaded.names,
            device=device,
            dtype=dtype,
            where=str(path / "model.safetensors"),
            what=loaded.describe(),
        )
        assert isinstance(model, Pi0Model)

        action_dim, state_dims = self._dims(loaded)
        embodiments = tuple(sorted(loaded.norms)) or ("default",)
        default = self.settings.norm_stats_key or embodiments[0]
        if not loaded.norms:
            state_dims = {"default": state_dims.get("default", action_dim)}
        slots = loaded.image_slots
        cameras = tuple(SLOT_TO_CAMERA.get(slot, slot) for slot in slots)
        trained = loaded.about.cameras  # a checkpoint may say it was trained with fewer cameras
        if trained and not set(trained) <= set(cameras):
            raise base.ModelLoadError(
                f"{path}: config.json names cameras {list(trained)}; the model has {list(cameras)}"
            )
        num_steps = self.settings.num_denoise_steps or loaded.num_steps or cfg.num_steps
        if demo:
            name = "pi0-demo (random weights, not a trained policy)"
        elif embedded:
            name = "pi0-metaworld-mt10 (trained in MetaWorld simulation, not a real-robot policy)"
        else:
            name = f"{'pi0.5' if cfg.pi05 else 'pi0'} {path.name} ({loaded.format} format)"
        if embedded and not demo:  # the shipped weights themselves (docs/evaluation.md cites it)
            version = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()[:12]
        else:
            version = hashlib.sha256(f"{path.resolve()}|{cfg}".encode()).hexdigest()[:12]
        self._info = base.ModelDescription(
            name=name,
            version=version,
            family="pi05" if cfg.pi05 else "pi0",
            action_dim=action_dim,
            chunk_size=min(self.settings.chunk_size, cfg.action_horizon),
            horizon=cfg.action_horizon,
            embodiments=embodiments,
            default_embodiment=default,
            state_dims=state_dims,
            camera_names=trained or cameras,
            image_size=(cfg.vision.image_size, cfg.vision.image_size),
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
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
        self._model, self._ckpt, self._tokenizer = model, loaded, tokenizer
        self._device = torch.device(device)
        self._num_steps = num_steps
        self._slots = slots
        self._camera_slot = {c: i for i, c in enumerate(cameras) if not trained or c in trained}
        # VLA_COMPILE: static shapes over the slots a camera can fill; compiled on the first forward
        self._static = (
            Pi0Static(model, slots=set(self._camera_slot.values())) if self.settings.compile else None
        )
        self._static_warm = False

    def _dims(self, loaded: ckpt.Checkpoint) -> tuple[int, dict[str, int]]:
        cfg = loaded.config
        if loaded.norms:
            sizes = {emb: n.actions.stats.size for emb, n in loaded.norms.items()}
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
            state_dims = {emb: (n.state.stats.size or action_dim) for emb, n in loaded.norms.items()}
        else:
            action_dim = self.settings.action_dim
            state_dims = {"default": action_dim}
        if action_dim > cfg.action_dim:
            raise base.ModelLoadError(f"action dim {action_dim} exceeds the model's {cfg.action_dim}")
        too_big = {e: d for e, d in state_dims.items() if d > cfg.action_dim}
        if too_big:
            raise base.ModelLoadError(f"state sizes {too_big} exceed the model's {cfg.action_dim}")
        return action_dim, state_dims

    @property
    def model_info(self) -> base.ModelDescription:
        if self._info is None:
            raise RuntimeError("Pi0Policy.load() has not been called")
        return self._info

    @property
    def config(self) -> Pi0Config:
        assert self._model is not None
        return self._model.cfg

    @property
    def model(self) -> Pi0Model:
        assert self._model is not None
        return self._model

    # ---- prepare -----------------------------------------------------------------------------

    def _norm(self, embodiment: str) -> ckpt.EmbodimentNorm | None:
        assert self._ckpt is not None
        return self._ckpt.norms.get(embodiment)

    def tokenize(
        self, instruction: str, normalized_state: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if normalized_state is not None:  # pi0.5: the state is in the prompt
            return tokenize_prompt(self._tokenizer, self.config, instruction, normalized_state)
        # pi0: a robot repeats its instruction for a whole episode; the arrays are never written.
        cached = self._prompts.get(instruction)
        if cached is None:
            cached = tokenize_prompt(self._tokenizer, self.config, instruction, None)
            if len(self._prompts) >= PROMPT_CACHE_SIZE:
                self._prompts.clear()
            self._prompts[instruction] = cached
        return cached

    def prepare(self, observation: base.Observation) -> base.PreparedSample:
        info = self.model_info
        cfg = self.config
        embodiment = self.resolve_embodiment(observation.embodiment)
        self.check_joints(observation, embodiment)
        images_in = {
            name if name in self._camera_slot else base.canonical_camera(name): image
            for name, image in observation.images.items()
        }
        unknown = sorted(set(images_in) - set(self._camera_slot))
        if unknown:
            raise base.InvalidObservation(
                "cameras",
                f"unknown camera(s) {', '.join(map(repr, unknown))}; "
                f"this model takes: {', '.join(info.camera_names)}",
            )
        if len(images_in) != len(observation.images):
            raise base.InvalidObservation("cameras", "the same camera is given twice (under an alias)")
        if not images_in:
            raise base.InvalidObservation(
                "cameras", f"at least one camera image is required ({', '.join(info.camera_names)})"
            )
        size = cfg.vision.image_size
        images = np.zeros((len(self._slots), 3, size, size), np.float32)
        masks = np.zeros(len(self._slots), bool)
        for camera, image in images_in.items():
            if (
                not isinstance(image, np.ndarray)
                or image.dtype != np.uint8
                or image.ndim != 3
                or image.shape[2] != 3
            ):
                raise base.InvalidObservation(
                    "cameras", f"camera {camera!r}: expected an (H, W, 3) uint8 RGB image"
                )
            slot = self._camera_slot[camera]
            image_to_model_input(image, size, out=images[slot])
            masks[slot] = True

        joints = np.asarray(observation.joint_positions, np.float32)
        norm = self._norm(embodiment)
        normalized = norm.state.normalize(joints) if norm is not None else joints.astype(np.float32)
        state = np.zeros(cfg.action_dim, np.float32)
        state[: normalized.shape[0]] = normalized
        prompt_state = None
        if cfg.pi05:
            # openpi discretises the unpadded state; LeRobot 0.4.0-0.4.4 the state padded to 32 dims.
            prompt_state = state if self.settings.pi05_prompt_state == "padded" else normalized
        tokens, token_mask = self.tokenize(observation.instruction, prompt_state)
        inputs = Pi0Inputs(images, masks, tokens, token_mask, state)
        return base.PreparedSample(inputs, embodiment, base.sample_seed(observation), batch_key=("pi0",))

    # ---- forward -----------------------------------------------------------------------------

    def noise(self, seed: int) -> torch.Tensor:
        cfg = self.config
        return torch.randn(
            (cfg.action_horizon, cfg.action_dim), generator=base.seeded_generator(seed), dtype=torch.float32
        )

    def forward(self, samples: Sequence[base.PreparedSample]) -> list[Any]:
        model = self.model
        inputs = [s.inputs for s in samples]
        used = max(int(i.token_mask.sum()) for i in inputs)  # trailing padding never influences valid tokens
        device = self._device

        def stack(name: str, dtype: torch.dtype) -> torch.Tensor:
            arr = np.stack([getattr(i, name) for i in inputs])
            return torch.from_numpy(arr).to(device=device, dtype=dtype)

        images = stack("images", model.dtype)
        image_masks = stack("image_masks", torch.bool)
        tokens = stack("tokens", torch.long)[:, :used]
        token_masks = stack("token_mask", torch.bool)[:, :used]
        state = stack("state", torch.float32)
        noise = torch.stack([self.noise(s.seed) for s in samples]).to(device)
        cfg = self.config
        prefix = rtc.BatchPrefix.stack([s.rtc for s in samples], cfg.action_horizon, cfg.action_dim, device)
        backward = prefix is not None and prefix.needs_backward
        batch = (images, image_masks, tokens, token_masks, state, noise)
        if self._static is not None and not backward:  # guidance with the Jacobian runs eagerly
            if not self._static_warm:
                self._warm_up(self._static, batch)
            actions, velocity = self._static.sample_actions(*batch, num_steps=self._num_steps, prefix=prefix)
        else:
            # The Jacobian differentiates through the action expert: no_grad then, not inference mode.
            with torch.no_grad() if backward else torch.inference_mode():
                actions, velocity = model.sample_actions(*batch, num_steps=self._num_steps, prefix=prefix)
        actions_np = actions.float().cpu().numpy()
        velocity_np = velocity.float().cpu().numpy()
        dt = 1.0 / self._num_steps
        return [Pi0Raw(actions_np[i], velocity_np[i], dt) for i in range(len(samples))]

    def _warm_up(self, runner: Pi0Static, batch: tuple[torch.Tensor, ...]) -> None:
        """Compile every bucket up to VLA_BATCH_SIZE on the first forward (the engine's warm-up),
        with copies of the batch's first row, so no later request waits for a compile."""

        def run(bucket: int) -> None:
            images, image_masks, tokens, token_masks, state, noise = (
                static.pad_rows(t[:1], bucket) for t in batch
            )
            runner.sample_actions(images, image_masks, tokens, token_masks, state, noise, self._num_steps)

        static.warm_up(
            f"{self.model_info.family} sampler", static.buckets_up_to(self.settings.batch_size), run
        )
        self._static_warm = True

    # ---- finish ------------------------------------------------------------------------------

    def finish(self, raw: Any, sample: base.PreparedSample) -> base.ActionPrediction:
        info = self.model_info
        assert isinstance(raw, Pi0Raw)
        norm = self._norm(sample.embodiment)
        actions = (
            norm.actions.unnormalize(raw.actions) if norm is not None else raw.actions.astype(np.float32)
        )
        actions = np.ascontiguousarray(actions[: info.chunk_size, : info.action_dim], dtype=np.float32)
        confidence = flow.confidence(raw.last_velocity, raw.dt, info.chunk_size, info.action_dim)
        return base.ActionPrediction(actions=actions, confidence=confidence, model_actions=raw.actions)

    def normalize_actions(self, actions: np.ndarray, embodiment: str) -> np.ndarray:
        norm = self._norm(embodiment)
        normalized = norm.actions.normalize(actions) if norm is not None else actions.astype(np.float32)
        out = np.zeros((actions.shape[0], self.config.action_dim), np.float32)
        out[:, : normalized.shape[1]] = normalized
        return out


__all__ = ["CAMERA_TO_SLOT", "IMAGE_SLOTS", "Pi0Policy"]
