"""Groot17Policy: NVIDIA GR00T N1.7 behind the VLAModel contract (VLA_MODEL_TYPE=groot, told from
N1.5 by config.json's model_type "Gr00tN1d7": models/registry.py).

Observation -> model inputs (prepare, CPU), as Isaac-GR00T 626af89's Gr00tPolicy + Gr00tN1d7Processor
(n17_processor.py, n17_images.py):
  * embodiment: a tag of processor_config.json's modality_configs with statistics and an
    embodiment_id.json index; "" = VLA_NORM_STATS_KEY when set, else the first such tag.
  * cameras: the tag's video keys in order, named in the server's camera vocabulary as for N1.5
    (policy.video_roles: a wrist / hand key is left_wrist or right_wrist, the first other one
    base); a frame may also be sent under its key, with or without "video.".
  * history: a tag whose video delta_indices reach back (e.g. [-15, 0]) reads those frames
    (Observation.past_images), one whose state delta_indices do, those joint positions
    (past_joint_positions); ModelInfo.image_history / state_history name the offsets. Predict must
    send them (INVALID_ARGUMENT on history otherwise); StreamControl fills them from the stream's
    earlier observations (engine/session.py). Offsets the tag does not read are ignored.
  * joint_positions: the tag's state keys' values concatenated in order (ModelInfo.state_layouts);
    joint_velocities are checked and unused.
  * images: letterbox, INTER_AREA resizes and centre crop as the published processor config says,
    the backbone's rescale / mean / std; the prompt: the instruction formalised, rendered with the
    backbone's chat template, image tokens expanded, tokenised; left padding in a batch.

Model outputs -> actions (finish, CPU): the first min(VLA_CHUNK_SIZE, len(action delta_indices))
rows of the 40-step chunk, each action key un-normalised, RELATIVE keys made absolute against the
observation's joint positions (n17_processor.py), concatenated (ModelInfo.action_layouts).
Not applied: LIBERO's gripper transform (Isaac-GR00T applies it in its LIBERO environment wrapper,
LeRobot as an optional decode step: gripper = -sign(2 g - 1)); the server answers what NVIDIA's
policy server answers, the environment's client converts (docs/models.md).

Real-time chunking: as N1.5; a chunk is remembered at its embodiment's horizon, a RELATIVE key's
values in robot units (absolute), and a prefix is made relative to the new observation's state before
sampling (rtc_prefix), so the previous chunk is continued in the robot's frame, not the old state's.

Batching: samples of different embodiments share a batch (batch_key None). VLA_COMPILE: batches
run through static.Groot17Static (prompt left-padded to the longest template +
STATIC_INSTRUCTION_TOKENS, images to the most per sample). Precision: bf16 on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vla_inference.models import base, rtc
from vla_inference.models.common.weights import read_json
from vla_inference.models.groot import n17_checkpoint as ckpt
from vla_inference.models.groot.cosmos import mrope_positions
from vla_inference.models.groot.model import STATIC_INSTRUCTION_TOKENS
from vla_inference.models.groot.n17 import Groot17, Groot17Batch, Groot17Config
from vla_inference.models.groot.n17_images import ImageTransform
from vla_inference.models.groot.n17_processor import (
    Embodiment17,
    Limits,
    Prompt,
    build_embodiments,
    formalize,
)
from vla_inference.models.groot.policy import GrootVersion, camera_map, describe_model, video_roles
from vla_inference.models.groot.static import Groot17Static
from vla_inference.models.policy import Loaded, Raw
from vla_inference.preprocessing.steps import CameraMap, pad_to

log = logging.getLogger(__name__)

CONTENTS = (
    "config.json with model_type Gr00tN1d7, *.safetensors, processor_config.json, statistics.json, "
    "embodiment_id.json"
)


@dataclass(frozen=True)
class Groot17Inputs:
    """One prepared sample (a Groot17Batch row before padding)."""

    pixels: torch.Tensor  # (T V, 3, S, S) float32: the images in prompt order
    input_ids: torch.Tensor  # (L,) long
    positions: torch.Tensor  # (3, L) M-RoPE positions
    state: torch.Tensor  # (T_s, max_state_dim) float32
    projector: int
    joints: np.ndarray  # (state_dim,) float64: the current joint positions (relative actions' reference)


@dataclass
class Groot17Loaded(Loaded[Groot17]):
    embodiments: dict[str, Embodiment17]
    cameras: dict[str, CameraMap]  # tag -> its cameras
    images: ImageTransform
    prompt: Prompt
    formalize_language: bool


def image_transform(
    kwargs: Mapping[str, Any], preprocessor: Mapping[str, Any], cfg: Groot17Config
) -> ImageTransform:
    """processor_config.json's eval transform + preprocessor_config.json; ModelLoadError for one the
    backbone's image processor would resize again, or the server cannot reproduce."""
    target = kwargs.get("image_target_size") or [cfg.image_size, cfg.image_size]
    crop = kwargs.get("image_crop_size")
    albumentations = bool(kwargs.get("use_albumentations", False))
    if albumentations:
        side = int(kwargs.get("shortest_image_edge") or target[0])
        fraction = kwargs.get("crop_fraction")
        fraction = float(fraction) if fraction is not None else (crop[0] / target[0] if crop else 1.0)
        crop_hw = (0, 0)
    else:
        if len(set(target)) != 1 or not crop:
            raise base.ModelLoadError(
                "processor_config.json: the torchvision transform needs a square image_target_size and an "
                f"image_crop_size (got {target}, {crop})"
            )
        side, fraction, crop_hw = int(target[0]), 0.0, (int(crop[0]), int(crop[1]))
    vision = cfg.backbone.vision
    factor = vision.patch_size * vision.merge
    size = preprocessor.get("size") or {}
    low = int(preprocessor.get("min_pixels") or size.get("shortest_edge") or 0)
    high = int(preprocessor.get("max_pixels") or size.get("longest_edge") or 1 << 62)
    mismatched = [
        f"{name} {preprocessor[name]} (the backbone: {ours})"
        for name, ours in (
            ("patch_size", vision.patch_size),
            ("merge_size", vision.merge),
            ("temporal_patch_size", vision.temporal_patch_size),
        )
        if name in preprocessor and int(preprocessor[name]) != ours
    ]
    if side % factor or not low <= side * side <= high or mismatched:
        raise base.ModelLoadError(
            f"preprocessor_config.json / processor_config.json: images of {side} x {side} would be resized "
            f"again by the backbone's image processor (multiples of {factor}, {low}..{high} pixels) "
            f"or do not fit it: {', '.join(mismatched) or 'size'}"
        )
    mean = tuple(float(v) for v in preprocessor.get("image_mean", (0.5, 0.5, 0.5)))
    std = tuple(float(v) for v in preprocessor.get("image_std", (0.5, 0.5, 0.5)))
    rescale = (
        float(preprocessor.get("rescale_factor", 1 / 255)) if preprocessor.get("do_rescale", True) else 1.0
    )
    if not preprocessor.get("do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return ImageTransform(albumentations, side, fraction, crop_hw, rescale, mean, std)  # type: ignore[arg-type]


class Groot17Policy(GrootVersion[Groot17Loaded, Groot17Batch, Groot17Config]):
    # --- loading ---------------------------------------------------------------------------

    def load_checkpoint(self, path: str | None) -> Groot17Loaded:
        where = base.checkpoint_dir(path, "GR00T N1.7", CONTENTS)
        backbone = ckpt.find_backbone_files(where, self.settings.tokenizer_path)
        cfg = ckpt.read_config(where, backbone.directory)
        files = ckpt.read_processor_files(where)
        kwargs = files.kwargs
        images = image_transform(kwargs, read_json(backbone.preprocessor_config), cfg)
        cfg = dataclasses.replace(cfg, image_size=images.side)
        head = cfg.head
        for name, ours in (("max_state_dim", head.max_state_dim), ("max_action_dim", head.action_dim)):
            if name in kwargs and int(kwargs[name]) != ours:
                raise base.ModelLoadError(f"processor_config.json {name}={kwargs[name]}, config.json {ours}")
        limits = Limits(
            head.max_state_dim,
            head.action_dim,
            head.action_horizon,
            head.state_history,
            head.max_num_embodiments,
        )
        embodiments, skipped = build_embodiments(
            kwargs, files.modalities, files.statistics, files.embodiment_ids, limits
        )
        for tag, why in skipped.items():
            log.warning("GR00T N1.7 embodiment %s is not served: %s", tag, why)
        if not embodiments:
            raise base.ModelLoadError(
                f"{where}: no embodiment of processor_config.json has statistics.json and "
                "embodiment_id.json entries"
            )
        if self.settings.groot_data_config:
            log.warning("VLA_GROOT_DATA_CONFIG is for N1.5; N1.7 reads processor_config.json (ignored)")
        for emb in embodiments.values():
            log.info("GR00T N1.7 embodiment %s", emb.describe())
        prompt = Prompt(
            backbone.chat_template,
            backbone.tokenizer,
            read_json(backbone.tokenizer_config),
            cfg.backbone.image_token_id,
            cfg.tokens_per_image,
        )
        network = ckpt.load_model(where, cfg, self.dtype, str(self.device))
        description = describe_model(
            self,
            where,
            "gr00t-n1.7",
            embodiments,
            {tag: e.cameras for tag, e in embodiments.items()},
            rows={tag: e.horizon for tag, e in embodiments.items()},
            horizon=head.action_horizon,
            image_size=images.side,
            # every frame is letterboxed to a square, then resized to `side` first (n17_images.py)
            decode_size=(images.side, images.side),
            description=(
                "NVIDIA GR00T N1.7 (Cosmos-Reason2-2B VLM + flow-matching DiT action head). Per embodiment: "
                + "; ".join(e.describe() for e in embodiments.values())
            ),
            image_history={tag: e.image_history for tag, e in embodiments.items() if e.image_history},
            state_history={tag: e.state_history for tag, e in embodiments.items() if e.state_history},
        )
        return Groot17Loaded(
            network=network,
            description=description,
            embodiments=embodiments,
            cameras={tag: camera_map(emb.cameras, tag) for tag, emb in embodiments.items()},
            images=images,
            prompt=prompt,
            formalize_language=bool(kwargs.get("formalize_language", True)),
        )

    def static_runner(self, loaded: Groot17Loaded) -> Groot17Static:
        """VLA_COMPILE: prompts left-padded to the longest embodiment's template +
        STATIC_INSTRUCTION_TOKENS (rounded up to 16), images to the most of an embodiment."""
        counts = {len(e.cameras) * len(e.video_offsets) for e in loaded.embodiments.values()}
        template = max(len(loaded.prompt.ids("", n)) for n in counts)
        length = -(-(template + STATIC_INSTRUCTION_TOKENS) // 16) * 16
        log.info(
            "VLA_COMPILE: GR00T N1.7 prompts padded to %d tokens, %d image(s) per sample", length, max(counts)
        )
        return Groot17Static(
            loaded.network,
            prompt_len=length,
            images_per_row=max(counts),
            backend=self.settings.compile_backend,
        )

    def warmup_observation(self) -> base.Observation:
        emb = self.loaded.embodiments[self.model_info.default_embodiment]
        side = self.loaded.images.side
        frames = {role: np.zeros((side, side, 3), np.uint8) for role, _ in video_roles(emb.cameras)}
        joints = np.zeros(emb.state_dim, np.float32)
        return base.Observation(
            images=frames,
            joint_positions=joints,
            instruction="warm up",
            embodiment=emb.tag,
            seed=0,
            past_images={offset: frames for offset in emb.image_history},
            past_joint_positions={offset: joints for offset in emb.state_history},
        )

    # --- prepare: history -> cameras -> frames -> prompt -> state -------------------------------

    def prepare(self, observation: base.Observation) -> base.PreparedSample:
        loaded, cfg = self.loaded, self.config
        emb = self.embodiment(observation.embodiment)
        self.check_joints(observation, emb.tag)
        steps = self._state_steps(observation, emb)
        frames = self._frames(observation, emb)
        pixels = np.stack([loaded.images(frame) for frame in frames])
        text = formalize(observation.instruction) if loaded.formalize_language else observation.instruction
        ids = torch.tensor(loaded.prompt.ids(text, len(frames)), dtype=torch.long)
        positions = mrope_positions(
            ids[None], torch.ones(1, ids.numel(), dtype=torch.bool), cfg.grid, cfg.backbone.image_token_id
        )
        with np.errstate(all="ignore"):
            state = pad_to(emb.encode_state(steps), cfg.head.max_state_dim)
        inputs = Groot17Inputs(
            pixels=torch.from_numpy(pixels),
            input_ids=ids,
            positions=positions[:, 0],
            state=torch.from_numpy(state),
            projector=emb.projector,
            joints=steps[-1],
        )
        return base.PreparedSample(
            inputs=inputs, embodiment=emb.tag, seed=base.sample_seed(observation), batch_key=None
        )

    def _state_steps(self, observation: base.Observation, emb: Embodiment17) -> np.ndarray:
        """(T_s, state_dim) float64: the past joint positions the tag reads, then the current."""
        _require(emb, emb.state_history, observation.past_joint_positions, "the joint positions")
        steps = []
        for offset in emb.state_history:
            joints = np.asarray(observation.past_joint_positions[offset], np.float64)
            if joints.shape != (emb.state_dim,) or not np.all(np.isfinite(joints)):
                raise base.InvalidObservation(
                    "history",
                    f"offset {offset}: expected {emb.state_dim} finite joint positions, got {joints.size}",
                )
            steps.append(joints)
        steps.append(np.asarray(observation.joint_positions, np.float64))
        return np.stack(steps)

    def _frames(self, observation: base.Observation, emb: Embodiment17) -> list[np.ndarray]:
        """The tag's images in prompt order: time-major over its video offsets, cameras in order."""
        _require(
            emb, emb.image_history, observation.past_images, f"the camera frames ({', '.join(emb.cameras)})"
        )
        cameras = self.loaded.cameras[emb.tag]
        frames: list[np.ndarray] = []
        for offset in emb.video_offsets:
            given = observation.images if offset == 0 else observation.past_images[offset]
            try:
                frames += [f for f in cameras(given) if f is not None]
            except base.InvalidObservation as exc:
                if offset == 0:
                    raise
                raise base.InvalidObservation("history", f"offset {offset}: {exc.message}") from None
        return frames

    # --- forward ---------------------------------------------------------------------------

    def collate(self, samples: Sequence[base.PreparedSample]) -> Groot17Batch:
        """Left-padded prompts (as upstream's tokenizer), zero images after a row's own."""
        inputs: list[Groot17Inputs] = [s.inputs for s in samples]
        B = len(inputs)
        length = max(int(x.input_ids.numel()) for x in inputs)
        views = max(int(x.pixels.shape[0]) for x in inputs)
        ids = torch.full((B, length), self.loaded.prompt.pad_id, dtype=torch.long)
        mask = torch.zeros(B, length, dtype=torch.bool)
        positions = torch.ones(B, 3, length, dtype=torch.long)
        pixels = torch.zeros(B, views, *inputs[0].pixels.shape[1:])
        for row, x in enumerate(inputs):
            n = int(x.input_ids.numel())
            ids[row, length - n :], mask[row, length - n :] = x.input_ids, True
            positions[row, :, length - n :] = x.positions
            pixels[row, : x.pixels.shape[0]] = x.pixels
        return Groot17Batch(
            pixels=pixels.to(self.device),
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            positions=positions.to(self.device),
            state=torch.stack([x.state for x in inputs]).to(self.device),
            embodiment_ids=torch.tensor([x.projector for x in inputs], dtype=torch.long, device=self.device),
        )

    def fits_static(self, batch: Groot17Batch) -> bool:
        return isinstance(self.static, Groot17Static) and self.static.fits(batch)

    def rtc_prefix(self, sample: base.PreparedSample) -> rtc.Prefix | None:
        """The prefix with its RELATIVE keys' rows made relative to this observation's state."""
        prefix: rtc.Prefix | None = sample.rtc
        emb = self.loaded.embodiments[sample.embodiment]
        if prefix is None or not emb.relative:
            return prefix
        return dataclasses.replace(
            prefix, actions=emb.in_frame(prefix.actions, prefix.overlap, sample.inputs.joints)
        )

    # --- finish ----------------------------------------------------------------------------

    def finish(self, raw: Any, sample: base.PreparedSample) -> base.ActionPrediction:
        assert isinstance(raw, Raw)
        emb = self.loaded.embodiments[sample.embodiment]
        joints = sample.inputs.joints
        remembered = emb.remembered(raw.actions[: emb.horizon], joints)
        return base.ActionPrediction(
            self.postprocess(raw.actions, sample), raw.confidence, model_actions=remembered
        )

    def postprocess(self, actions: np.ndarray, sample: base.PreparedSample) -> np.ndarray:
        emb = self.loaded.embodiments[sample.embodiment]
        rows = min(self.settings.chunk_size, emb.horizon)
        return emb.decode(actions[:rows], sample.inputs.joints)

    def normalize_actions(self, actions: np.ndarray, embodiment: str) -> np.ndarray:
        """Robot actions -> the units a chunk is remembered in (RELATIVE keys stay absolute)."""
        emb = self.loaded.embodiments[embodiment]
        return pad_to(emb.encode(np.asarray(actions, np.float64), None), self.config.head.action_dim)


def _require(emb: Embodiment17, offsets: Sequence[int], given: Mapping[int, Any], what: str) -> None:
    """InvalidObservation on history unless every offset the embodiment reads was given."""
    missing = [o for o in offsets if o not in given]
    if missing:
        raise base.InvalidObservation(
            "history",
            f"embodiment {emb.tag!r} reads {what} of steps {list(offsets)} before this one; "
            f"missing offsets {missing}",
        )
