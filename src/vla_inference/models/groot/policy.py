"""GrootPolicy: NVIDIA GR00T N1.5 behind the VLAModel contract.

Observation -> model inputs (prepare, CPU), as NVIDIA's Gr00tPolicy with the chosen data config:
  * embodiment: Observation.embodiment is an N1.5 embodiment tag; the supported tags are the
    metadata.json entries with a known projector id (embodiments.py). "" = the default:
    VLA_NORM_STATS_KEY when set, else the first supported tag in metadata.json.
    The original design's example "unitree_h1" is not an N1.5 embodiment: an H1 is served by a
    fine-tune saved under "new_embodiment"; the tag "unitree_h1" itself is refused with the list
    of supported tags.
  * data config (data_configs.py, VLA_GROOT_DATA_CONFIG): names the state / action / video keys
    served and their order, and how each key is transformed. joint_positions = the config's
    state keys' values concatenated in its order (ModelInfo.state_layouts names each value);
    each key is rotated (rotations.py) / normalised / sin-cos encoded as upstream, then the
    whole is zero-padded to max_state_dim (64) as upstream's GR00TTransform does.
    joint_velocities are checked but unused (N1.5 has no velocity input).
  * cameras: the config's video keys in its order, one frame each, named in the server's camera
    vocabulary (camera_roles); a frame may also be sent under the key's own name (e.g.
    "ego_view"). ModelInfo.camera_names lists the union over the supported embodiments.
    Each frame goes through upstream's eval video transform (video.py): a frame of another size
    than the camera's metadata resolution is first resized to it (bilinear, antialias), then
    centre-cropped to 95 %, resized to 224 x 224, truncated to uint8 and scaled to [-1, 1];
    one 256-token tile per view.
  * prompt: the Eagle 2.5 Qwen3 chat format (default system turn, one user turn with the
    images then the text, generation prompt), with each image placeholder expanded by the
    Eagle processor to "<image N><img>" + 256 x <IMG_CONTEXT> + "</img>":
        <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n
        <image 1><img><IMG_CONTEXT>...</img>{text}<|im_end|>\n<|im_start|>assistant\n
    {text} is str([instruction]) - upstream's transform hands the language over as a
    one-element array, and the LeRobot port of N1.5 reproduces that spelling. Simplification:
    no dynamic tiling / thumbnail (a 224 x 224 frame is a single tile upstream as well).

Model outputs -> actions (finish, CPU):
  * 16-step horizon; the first min(VLA_CHUNK_SIZE, 16) steps are returned.
  * the 32-dim model action is cut to the config's action keys (its order), each decoded with
    the inverse of its transform (no clipping), concatenated: (chunk, action_dim of the
    embodiment); ModelInfo.action_layouts names each value.
  * confidence = 1 / (1 + RMS(v_last * dt)) over the returned steps and dims, where v_last is
    the velocity of the final Euler step and dt = 1 / steps, in normalised units: how far the
    last step still moved the actions; 1 = the flow had settled.

Batching: samples of different embodiments share a batch (the category-specific layers pick
weights per sample), so batch_key is None. Each sample draws its noise from its own seed.
VLA_COMPILE: batches run through static.GrootStatic (prompt padded to the longest template +
STATIC_INSTRUCTION_TOKENS, compiled per batch bucket by the engine's warm-up); real-time chunking
guided with the Jacobian and longer prompts run eagerly.
Precision: bfloat16 on CUDA, float32 on CPU (VLA_DTYPE overrides).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch

from vla_inference.models import base, rtc
from vla_inference.models.common import flow
from vla_inference.models.groot import checkpoint as ckpt
from vla_inference.models.groot.data_configs import parse_setting
from vla_inference.models.groot.embodiments import (
    Embodiment,
    build_embodiments,
    embodiment_ids,
    read_metadata,
)
from vla_inference.models.groot.model import GR00TN15, STATIC_INSTRUCTION_TOKENS, GrootBatch, GrootConfig
from vla_inference.models.groot.static import GrootStatic
from vla_inference.models.groot.video import frame_to_pixels
from vla_inference.models.policy import FlowPolicy, Loaded
from vla_inference.preprocessing import steps
from vla_inference.preprocessing.steps import CameraMap, CameraSlot, pad_to

DEFAULT_INSTRUCTION = "Perform the default behavior."
SYSTEM_PROMPT = "You are a helpful assistant."
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrootInputs:
    """One prepared sample (a GrootBatch row, before padding)."""

    pixels: torch.Tensor  # (V, 3, S, S) float32, normalised
    input_ids: torch.Tensor  # (L,) long
    state: torch.Tensor  # (max_state_dim,) float32, normalised + zero padded
    embodiment_id: int


@dataclass
class GrootLoaded(Loaded[GR00TN15]):
    tokenizer: Any
    embodiments: dict[str, Embodiment]
    cameras: dict[str, CameraMap]  # embodiment -> its cameras, in data config order


def prompt_text(instruction: str, num_images: int, tokens_per_image: int) -> str:
    images = "".join(
        f"<image {i + 1}><img>{ckpt.IMAGE_CONTEXT_TOKEN * tokens_per_image}</img>" for i in range(num_images)
    )
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{images}{[instruction]!s}<|im_end|>\n<|im_start|>assistant\n"
    )


L = TypeVar("L", bound=Loaded[Any])
B = TypeVar("B", bound=tuple[Any, ...])
C = TypeVar("C")


class GrootVersion(FlowPolicy[L, B], Generic[L, B, C]):
    """What the GR00T versions' policies share (N1.5 below, N1.7 in n17_policy.py): the config, the
    embodiment lookup, the action head's step count and chunk shape, the width the confidence reads.
    The loaded state has `embodiments`, each with its `model_action_dim`."""

    model_type = "groot"

    @property
    def config(self) -> C:
        return self.loaded.network.cfg  # type: ignore[no-any-return]

    def action_width(self, sample: base.PreparedSample) -> int:
        return int(self.loaded.embodiments[sample.embodiment].model_action_dim)  # type: ignore[attr-defined]

    def embodiment(self, tag: str) -> Any:
        return self.loaded.embodiments[self.resolve_embodiment(tag)]  # type: ignore[attr-defined]

    def num_steps(self) -> int:
        return int(self.settings.num_denoise_steps or self.loaded.network.cfg.head.num_inference_timesteps)

    def noise_shape(self) -> tuple[int, int]:
        head = self.loaded.network.cfg.head
        return int(head.action_horizon), int(head.action_dim)


class GrootPolicy(GrootVersion[GrootLoaded, GrootBatch, GrootConfig]):
    # --- loading ---------------------------------------------------------------------------

    def load_checkpoint(self, path: str | None) -> GrootLoaded:
        where = base.checkpoint_dir(
            path,
            "GR00T N1.5",
            "config.json, *.safetensors, experiment_cfg/metadata.json, tokenizer.json",
        )
        cfg = ckpt.read_config(where)
        lerobot = ckpt.says_lerobot(where)
        embodiments, skipped = build_embodiments(
            read_metadata(where),
            parse_setting(self.settings.groot_data_config),
            lerobot=lerobot,
            max_state_dim=cfg.max_state_dim,
            max_action_dim=cfg.action_dim,
        )
        if skipped:
            log.warning(
                "GR00T metadata.json tags without a known embodiment id are not served: %s (known: %s)",
                ", ".join(skipped),
                ", ".join(embodiment_ids(lerobot)),
            )
        for emb in embodiments.values():
            log.info("GR00T embodiment %s", emb.describe())
        tokenizer = ckpt.load_tokenizer(ckpt.find_tokenizer(where, self.settings.tokenizer_path), cfg)
        network = ckpt.load_model(where, cfg, self.dtype, self.device)

        description = describe_model(
            self,
            where,
            "gr00t-n1.5",
            embodiments,
            {tag: e.video_keys for tag, e in embodiments.items()},
            rows=cfg.action_horizon,
            horizon=cfg.action_horizon,
            image_size=cfg.image_size,
            description=describe(embodiments.values(), lerobot),
            decode_size=decode_size(embodiments.values(), cfg.image_size),
        )
        return GrootLoaded(
            network=network,
            description=description,
            tokenizer=tokenizer,
            embodiments=embodiments,
            cameras={tag: camera_map(emb.video_keys, tag) for tag, emb in embodiments.items()},
        )

    def static_runner(self, loaded: GrootLoaded) -> GrootStatic:
        """VLA_COMPILE: the prompt padded to the longest embodiment's template + STATIC_INSTRUCTION_TOKENS
        (rounded up to 16), the images to the most cameras of an embodiment. Longer prompts run eagerly."""
        cfg = loaded.network.cfg
        views = max(len(emb.video_keys) for emb in loaded.embodiments.values())
        template = max(
            len(
                loaded.tokenizer.encode(
                    prompt_text("", len(emb.video_keys), cfg.backbone.num_image_tokens),
                    add_special_tokens=False,
                ).ids
            )
            for emb in loaded.embodiments.values()
        )
        length = -(-(template + STATIC_INSTRUCTION_TOKENS) // 16) * 16
        log.info("VLA_COMPILE: GR00T prompts padded to %d tokens, %d image(s) per sample", length, views)
        return GrootStatic(
            loaded.network, prompt_len=length, images_per_row=views, backend=self.settings.compile_backend
        )

    def warmup_observation(self) -> base.Observation:
        info = self.model_info
        emb = self.loaded.embodiments[info.default_embodiment]
        size = info.image_size
        images = {
            role: np.zeros((*(camera.resolution or size)[::-1], 3), np.uint8)
            for role, camera in zip((r for r, _ in camera_roles(emb)), emb.cameras, strict=True)
        }
        joints = np.zeros(emb.state_dim, np.float32)
        return base.Observation(images=images, joint_positions=joints, instruction="warm up", seed=0)

    # --- prepare: cameras -> frames -> prompt -> state ----------------------------------------

    def prepare(self, observation: base.Observation) -> base.PreparedSample:
        loaded, cfg = self.loaded, self.config
        emb = self.embodiment(observation.embodiment)
        self.check_joints(observation, emb.tag)
        frames = loaded.cameras[emb.tag](observation.images)
        pixels = np.stack(
            [
                frame_to_pixels(frame, cfg.image_size, camera.resolution, emb.crop_scale)
                for frame, camera in zip(frames, emb.cameras, strict=True)
                if frame is not None
            ]
        )
        instruction = observation.instruction.strip() or DEFAULT_INSTRUCTION
        text = prompt_text(instruction, len(emb.video_keys), cfg.backbone.num_image_tokens)
        ids = loaded.tokenizer.encode(text, add_special_tokens=False).ids
        with np.errstate(divide="ignore", invalid="ignore"):
            state = pad_to(emb.encode_state(observation.joint_positions), cfg.max_state_dim)
        if not np.all(np.isfinite(state)):
            raise base.InvalidObservation(
                "joint_positions",
                f"a value of embodiment {emb.tag!r} cannot be converted as its data config asks "
                "(e.g. an all-zero quaternion); layout: " + ", ".join(k.describe() for k in emb.state),
            )
        inputs = GrootInputs(
            pixels=torch.from_numpy(pixels),
            input_ids=torch.tensor(ids, dtype=torch.long),
            state=torch.from_numpy(state),
            embodiment_id=emb.id,
        )
        return base.PreparedSample(
            inputs=inputs, embodiment=emb.tag, seed=base.sample_seed(observation), batch_key=None
        )

    # --- forward ---------------------------------------------------------------------------

    def collate(self, samples: Sequence[base.PreparedSample]) -> GrootBatch:
        inputs: list[GrootInputs] = [s.inputs for s in samples]
        length = max(int(x.input_ids.numel()) for x in inputs)
        views = max(int(x.pixels.shape[0]) for x in inputs)
        ids = torch.zeros(len(inputs), length, dtype=torch.long)
        mask = torch.zeros(len(inputs), length, dtype=torch.bool)
        pixels = torch.zeros(len(inputs), views, *inputs[0].pixels.shape[1:])
        for row, x in enumerate(inputs):
            n = int(x.input_ids.numel())
            ids[row, :n] = x.input_ids  # right padding: the causal LM never sees it
            mask[row, :n] = True
            pixels[row, : x.pixels.shape[0]] = x.pixels  # zero images after a row's own views
        return GrootBatch(
            pixels=pixels.to(self.device),
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            state=torch.stack([x.state for x in inputs])[:, None].to(self.device),  # (B, 1, S)
            embodiment_ids=torch.tensor(
                [x.embodiment_id for x in inputs], dtype=torch.long, device=self.device
            ),
        )

    def fits_static(self, batch: GrootBatch) -> bool:
        return isinstance(self.static, GrootStatic) and self.static.fits(batch)

    # --- postprocess -------------------------------------------------------------------------

    def postprocess(self, actions: np.ndarray, sample: base.PreparedSample) -> np.ndarray:
        emb = self.loaded.embodiments[sample.embodiment]
        return emb.decode_actions(actions[: self.model_info.chunk_size])

    def normalize_actions(self, actions: np.ndarray, embodiment: str) -> np.ndarray:
        emb = self.loaded.embodiments[embodiment]
        return pad_to(emb.encode_actions(actions), self.config.action_dim)


def decode_size(embodiments: Iterable[Embodiment], image_size: int) -> tuple[int, int]:
    """The least (width, height) any camera frame is decoded at (preprocessing/images.py decodes a
    JPEG at least twice as large at reduced scale, never below it): the largest first resize of any
    camera of any embodiment, i.e. its metadata resolution, or for a camera without one the model's
    image size before the centre crop (video.py)."""
    width = height = 0
    for emb in embodiments:
        before_crop = math.ceil(image_size / (emb.crop_scale or 1.0))
        for camera in emb.cameras:
            w, h = camera.resolution or (before_crop, before_crop)
            width, height = max(width, w), max(height, h)
    return width or image_size, height or image_size


class ServedEmbodiment(Protocol):
    """What the model description reads of an embodiment (N1.5's Embodiment, N1.7's Embodiment17)."""

    @property
    def state_dim(self) -> int: ...

    @property
    def action_dim(self) -> int: ...

    def state_names(self) -> tuple[str, ...]: ...

    def action_names(self) -> tuple[str, ...]: ...


def describe_model(
    policy: FlowPolicy[Any, Any],
    where: Path,
    version: str,
    embodiments: Mapping[str, ServedEmbodiment],
    cameras: Mapping[str, Sequence[str]],  # tag -> its video keys
    *,
    rows: int | Mapping[str, int],  # actions per chunk before VLA_CHUNK_SIZE (per embodiment)
    horizon: int,
    image_size: int,
    description: str,
    **extra: Any,
) -> base.ModelDescription:
    """The ModelDescription of both GR00T versions: the default embodiment (VLA_NORM_STATS_KEY, else
    the first) and its cameras first, then the others', the layouts per embodiment."""
    default = policy.settings.norm_stats_key.strip() or next(iter(embodiments))
    if default not in embodiments:
        raise base.ModelLoadError(
            f"VLA_NORM_STATS_KEY={default!r} is not a supported embodiment of {where}; "
            f"supported: {', '.join(embodiments)}"
        )
    names: list[str] = []
    for keys in (cameras[default], *cameras.values()):
        names += [role for role, _ in video_roles(keys) if role not in names]
    first = embodiments[default]
    return base.ModelDescription(
        name=where.name,
        version=version,
        family="groot",
        action_dim=first.action_dim,
        chunk_size=min(policy.settings.chunk_size, rows if isinstance(rows, int) else rows[default]),
        horizon=horizon,
        embodiments=tuple(embodiments),
        default_embodiment=default,
        state_dims={tag: e.state_dim for tag, e in embodiments.items()},
        camera_names=tuple(names),
        image_size=(image_size, image_size),
        device=str(policy.device),
        dtype=str(policy.dtype).removeprefix("torch."),
        confidence_definition=flow.CONFIDENCE_DEFINITION,
        description=description,
        state_layouts={tag: e.state_names() for tag, e in embodiments.items()},
        action_layouts={tag: e.action_names() for tag, e in embodiments.items()},
        rtc_methods=rtc.FLOW_METHODS,
        camera_keys={
            tag: {role: _short(key) for role, key in video_roles(keys)} for tag, keys in cameras.items()
        },
        **extra,
    )


def camera_map(video_keys: Sequence[str], tag: str) -> CameraMap:
    """An embodiment's cameras in data config order (video_roles), each also taken under its
    video key, with or without "video."; all required; other cameras are ignored (N1.5 and N1.7)."""
    slots = []
    for role, key in video_roles(video_keys):
        short = _short(key).lower()
        slots.append(CameraSlot(role, aliases=(short, f"video.{short}"), required=True))
    return CameraMap(tuple(slots), at_least=0, refuse_unknown=False, model=f"embodiment {tag!r}")


def _short(key: str) -> str:
    return key.removeprefix("video.")


def video_roles(video_keys: Sequence[str]) -> list[tuple[str, str]]:
    """(server camera name, video key) per video key, in order: preprocessing/steps.py
    `camera_roles` of the keys without "video.", lower-case (e.g. "ego_view" -> "base"). A frame
    may also be sent under the key's own name, with or without "video." (N1.5 and N1.7)."""
    roles = steps.camera_roles([_short(key).lower() for key in video_keys])
    return list(zip(roles, video_keys, strict=True))


def camera_roles(emb: Embodiment) -> list[tuple[str, str]]:
    """video_roles of an N1.5 embodiment's video keys, in data config order."""
    return video_roles(emb.video_keys)


def describe(embodiments: Iterable[Embodiment], lerobot: bool) -> str:
    """ModelInfo.description: what is served, per embodiment."""
    origin = "a LeRobot GR00T N1.5 checkpoint" if lerobot else "NVIDIA GR00T N1.5"
    return (
        f"{origin} (Eagle 2.5 VLM + flow-matching DiT action head). Per embodiment: "
        + "; ".join(e.describe() for e in embodiments)
        + ". Cameras of another size than listed are resized to it first."
    )
