"""OpenVLA 7B and OpenVLA-OFT behind the VLAModel contract.

OpenVLAPolicy serves OpenVLA checkpoints, OpenVLAOFTPolicy OpenVLA-OFT ones (the merged OpenVLA with
the action head and proprio projector beside it); `variant_class` (the registry's detect) tells them
apart. PrismaticPolicy is what both serve alike: the prompt and its tokenizer, the datasets
(unnorm_key), the instruction check, the output step.

OpenVLA:

prepare   one "base" camera image -> 224 px (checkpoint's resize strategy, bicubic) -> two
          normalisations (DINOv2 ImageNet mean/std, SigLIP 0.5/0.5) stacked to (6, 224, 224);
          prompt "In: What action should the robot take to {instruction.lower()}?\\nOut:" ->
          [BOS] + SentencePiece ids, + 29871 ("▁") when the prompt does not already end with it.
forward   batched greedy decoding of action_dim tokens (padding masked, per-sample positions);
          with VLA_COMPILE the static-shape decoder (static.OpenVLAStatic: prompts padded to
          STATIC_PROMPT_TOKENS, a KV cache per batch bucket, compiled prefill and decode step);
          a longer prompt is decoded eagerly. Tokens -> bin centres in [-1, 1] (the raw output).
finish    un-normalised with the dataset's q01/q99 (masked dimensions pass; preprocessing/steps.py).

Embodiments are the datasets in norm_stats (the reference's `unnorm_key`). A request's
embodiment_tag picks one; an empty tag takes VLA_NORM_STATS_KEY, else the only dataset, and
is refused, listing the datasets, when the checkpoint has several and no default is set.

OpenVLA conditions on the image and the instruction only: joint_positions are not used, any
number of finite values is accepted (state_dims is empty). The model predicts one action per
step: horizon 1, chunk size 1. Decoding is greedy, so the request seed changes nothing.

OpenVLA-OFT:

prepare   cameras base, left_wrist (wrist), right_wrist: the first num_images_in_input, all required
          (upstream: full_image, then the wrist images) -> OFT's evaluation pipeline (a frame that is
          not 224 x 224: TF's JPEG round trip and Lanczos-3 to 224; then the 90%-area centre crop back
          to 224, preprocessing/tf_resize.py) -> the Prismatic processor as OpenVLA (I, 6, S, S);
          joint_positions (the proprio, P values) normalised with the dataset's bounds (q01/q99, or
          min/max), clipped to [-1, 1]; the prompt as OpenVLA's.
forward   one bidirectional pass for the whole batch (oft.OpenVLAOFT), prompts of different lengths
          left-padded and masked, each row its single-robot answer; VLA_COMPILE: static.OFTStatic.
finish    un-normalised with the dataset's bounds + 1e-8 (masked dimensions pass), sliced to
          min(VLA_CHUNK_SIZE, chunk) actions. Confidence: none (an L1 regression head), always 1.0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from PIL import Image

from vla_inference.models import base
from vla_inference.models.common.tokenizers import find_tokenizer, load_sentencepiece
from vla_inference.models.openvla.checkpoint import (
    TOKENIZER_FILE,
    CheckpointInfo,
    ImageSpec,
    load_model,
    read_checkpoint,
)
from vla_inference.models.openvla.model import STATIC_PROMPT_TOKENS, OpenVLA, OpenVLAConfig, Prismatic
from vla_inference.models.openvla.oft import OFTBatch, OpenVLAOFT
from vla_inference.models.openvla.oft_checkpoint import (
    OFTCheckpointInfo,
    OFTChoices,
    is_oft_checkpoint,
    load_oft_model,
    read_oft_checkpoint,
)
from vla_inference.models.openvla.static import OFTStatic, OpenVLAStatic
from vla_inference.models.policy import Loaded, Policy, Raw
from vla_inference.preprocessing.steps import ActionOutput, CameraMap, CameraSlot, StateInput
from vla_inference.preprocessing.tf_resize import OFT_IMAGE_SIZE, oft_eval_image

logger = logging.getLogger(__name__)

CAMERA = "base"
SPACE_TOKEN = 29871  # Llama-2 "▁": the reference appends it after "Out:" (as seen in training)
PROMPT = "In: What action should the robot take to {}?\nOut:"
CONFIDENCE_DEFINITION = (
    "geometric mean over the action_dim greedily decoded action tokens of each token's softmax "
    "probability (over the full vocabulary)"
)
# OpenVLA-OFT's cameras in upstream's order (full_image, then the wrist images), the first
# num_images_in_input of them.
OFT_CAMERAS = (CAMERA, "left_wrist", "right_wrist")
OFT_CONFIDENCE = 1.0
OFT_CONFIDENCE_DEFINITION = (
    "none: OpenVLA-OFT's L1 regression head outputs the actions directly, with no probability or spread "
    "to measure, so confidence is always 1.0"
)


@dataclass(frozen=True)
class OpenVLAInputs:
    pixels: torch.Tensor  # (6, S, S) float32: DINOv2-normalised RGB, then SigLIP-normalised RGB
    input_ids: torch.Tensor  # (L,) int64: BOS, prompt, 29871
    unnorm_key: str
    n_tokens: int  # action dimensions to decode


@dataclass(frozen=True)
class OFTInputs:
    pixels: torch.Tensor  # (I, 6, S, S) float32: per camera DINOv2- then SigLIP-normalised RGB
    proprio: torch.Tensor  # (P,) float32, normalised and clipped
    input_ids: torch.Tensor  # (L,) int64: BOS, prompt, 29871


N = TypeVar("N", bound=Prismatic)


@dataclass
class PrismaticLoaded(Loaded[N]):
    tokenizer: Any
    default_key: str  # "" = requests must name the dataset
    outputs: dict[str, ActionOutput]  # dataset (unnorm_key) -> action step


@dataclass
class OpenVLALoaded(PrismaticLoaded[OpenVLA]):
    checkpoint: CheckpointInfo


@dataclass
class OFTLoaded(PrismaticLoaded[OpenVLAOFT]):
    checkpoint: OFTCheckpointInfo
    cameras: CameraMap
    states: dict[str, StateInput]  # dataset -> proprio step (empty without a proprio projector)


L = TypeVar("L", bound=PrismaticLoaded[Any])


def bin_centers(n_bins: int) -> np.ndarray:
    """(n_bins - 1,) centres of n_bins uniform edges over [-1, 1]."""
    edges = np.linspace(-1.0, 1.0, n_bins)
    return (edges[:-1] + edges[1:]) / 2.0


def detokenize(tokens: np.ndarray, vocab_size: int, n_bins: int = 256) -> np.ndarray:
    """Action token ids -> normalised actions in [-1, 1] (reference predict_action).

    vocab_size is the un-padded Llama vocabulary (text_config.vocab_size - pad_to_multiple_of,
    32064 - 64 = 32000): bin = clip(vocab_size - id - 1, 0, n_bins - 2). Ids below the action
    range saturate at the top bin, as in the reference.
    """
    centers = bin_centers(n_bins)
    bins = np.clip(vocab_size - np.asarray(tokens, np.int64) - 1, 0, centers.shape[0] - 1)
    return centers[bins]


def _resample(name: str) -> Image.Resampling:
    return Image.Resampling.BICUBIC if name == "bicubic" else Image.Resampling.BILINEAR


def preprocess_image(image: np.ndarray, spec: ImageSpec) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (6, S, S) float32, following the reference PrismaticImageProcessor."""
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB")
    size, resample = spec.size, _resample(spec.interpolation)
    if spec.resize_strategy == "letterbox":
        # Pad to a square (the reference fills with the last tower's mean, 0.5 -> 127), then resize.
        width, height = pil.size
        side = max(width, height)
        fill = tuple(int(m * 255) for m in spec.means[-1])
        padded = Image.new("RGB", (side, side), fill)  # type: ignore[arg-type]
        padded.paste(pil, (int((side - width) / 2), int((side - height) / 2)))
        pil = padded.resize((size, size), resample=resample)
    elif spec.resize_strategy == "resize-crop":
        width, height = pil.size
        short = min(width, height)
        new_w, new_h = (
            (size, int(size * height / width)) if width == short else (int(size * width / height), size)
        )
        pil = pil.resize((new_w, new_h), resample=resample)
        left, top = round((new_w - size) / 2.0), round((new_h - size) / 2.0)
        pil = pil.crop((left, top, left + size, top + size))
    elif pil.size != (size, size):  # resize-naive (openvla-7b)
        pil = pil.resize((size, size), resample=resample)
    rgb = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
    towers = []
    for mean, std in zip(spec.means, spec.stds, strict=True):
        towers.append((rgb - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    return torch.cat(towers, dim=0).contiguous()


CAMERAS = CameraMap((CameraSlot(CAMERA, required=True),), model="OpenVLA")


def geometric_mean(probs: np.ndarray) -> float:
    """CONFIDENCE_DEFINITION of one sample's token probabilities (n,)."""
    clipped = np.clip(probs.astype(np.float64), 1e-30, 1.0)
    return min(max(float(np.exp(np.mean(np.log(clipped)))), 0.0), 1.0)


def decoded(tokens: np.ndarray, probs: np.ndarray, cfg: OpenVLAConfig) -> Raw:
    """One sample's greedy tokens (n,) and their probabilities -> the raw output: the normalised
    action (1, n) in [-1, 1] and its confidence."""
    actions = detokenize(tokens, cfg.action_vocab_size, cfg.n_action_bins)[None].astype(np.float32)
    return Raw(actions, geometric_mean(probs))


class PrismaticPolicy(Policy[L]):
    """What OpenVLA and OpenVLA-OFT serve alike: the datasets and their default, the tokenizer and the
    prompt, the instruction check, the output step."""

    model_type: ClassVar[str] = "openvla"
    family_name: ClassVar[str] = "OpenVLA"  # for messages

    def default_key(self, datasets: Sequence[str]) -> str:
        """VLA_NORM_STATS_KEY, else the only dataset, else "" (requests must name one)."""
        key = self.settings.norm_stats_key.strip()
        if key and key not in datasets:
            available = ", ".join(sorted(datasets))
            raise base.ModelLoadError(
                f"VLA_NORM_STATS_KEY={key!r} is not in the checkpoint; available: {available}"
            )
        return key or (datasets[0] if len(datasets) == 1 else "")

    def load_tokenizer(self, info: CheckpointInfo) -> Any:
        tokenizer_file = find_tokenizer(
            info.path,
            self.settings.tokenizer_path,
            TOKENIZER_FILE,
            f"{self.family_name} needs the Llama-2 SentencePiece tokenizer.model of openvla/openvla-7b.",
        )
        return load_sentencepiece(tokenizer_file, info.config.vocab_size)

    def describe(
        self, info: CheckpointInfo, datasets: Sequence[str], default: str, **fields: Any
    ) -> base.ModelDescription:
        """The ModelDescription fields both variants fill alike, plus `fields`."""
        return base.ModelDescription(
            name=info.path.name,
            version="+".join(
                str(info.raw_config.get(k, "?")) for k in ("vision_backbone_id", "llm_backbone_id")
            ),
            family="openvla",
            embodiments=tuple(datasets),
            default_embodiment=default,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            **fields,
        )

    def tokenize(self, instruction: str) -> torch.Tensor:
        """Instruction -> (L,) int64 ids: [BOS] + prompt + 29871 (when missing)."""
        tokenizer = self.loaded.tokenizer
        ids = tokenizer.encode(PROMPT.format(instruction.lower()))
        bos = tokenizer.bos_id()
        ids = [bos if bos >= 0 else 1, *ids]
        if ids[-1] != SPACE_TOKEN:
            ids.append(SPACE_TOKEN)
        return torch.tensor(ids, dtype=torch.long)

    def unnorm_key(self, tag: str) -> str:
        key = self.resolve_embodiment(tag)
        if not key:
            raise base.InvalidObservation(
                "embodiment_tag",
                f"this {self.family_name} checkpoint has statistics for several datasets; name one as "
                f"embodiment_tag (or set VLA_NORM_STATS_KEY): {', '.join(self.model_info.embodiments)}",
            )
        return key

    def instruction(self, observation: base.Observation) -> str:
        instruction = observation.instruction.strip()
        if not instruction:
            raise base.InvalidObservation(
                "language_instruction", f"{self.family_name} needs a language instruction"
            )
        return instruction

    def postprocess(self, actions: np.ndarray, sample: base.PreparedSample) -> np.ndarray:
        return self.loaded.outputs[sample.embodiment](actions)


class OpenVLAPolicy(PrismaticPolicy[OpenVLALoaded]):
    compiled_name = "decoder"

    # --- loading ----------------------------------------------------------------------------

    def load_checkpoint(self, path: str | None) -> OpenVLALoaded:
        where = base.checkpoint_dir(path, "OpenVLA", "config.json, model*.safetensors, tokenizer.model")
        info = read_checkpoint(where)
        datasets = sorted(info.norm_stats)
        default = self.default_key(datasets)
        tokenizer = self.load_tokenizer(info)
        network = load_model(info, self.device, self.dtype)
        action_dim = info.norm_stats[default or datasets[0]].dim
        description = self.describe(
            info,
            datasets,
            default,
            action_dim=action_dim,
            chunk_size=1,
            horizon=1,
            state_dims={},
            camera_names=(CAMERA,),
            image_size=(info.image.size, info.image.size),
            decode_size=(info.image.size, info.image.size),
            confidence_definition=CONFIDENCE_DEFINITION,
        )
        logger.info(
            "loaded OpenVLA from %s on %s (%s); datasets: %s; default: %s",
            info.path,
            self.device,
            self.dtype,
            ", ".join(datasets),
            default or "(none: requests must name one)",
        )
        outputs = {
            name: ActionOutput(stats.normalizer(), 1, stats.dim, stats.dim)
            for name, stats in info.norm_stats.items()
        }
        return OpenVLALoaded(network, description, tokenizer, default, outputs, info)

    def static_runner(self, loaded: OpenVLALoaded) -> OpenVLAStatic:
        most_tokens = max(stats.dim for stats in loaded.checkpoint.norm_stats.values())
        return OpenVLAStatic(
            loaded.network, STATIC_PROMPT_TOKENS, most_tokens, backend=self.settings.compile_backend
        )

    def warmup_observation(self) -> base.Observation:
        loaded = self.loaded
        size = loaded.checkpoint.image.size
        return base.Observation(
            images={CAMERA: np.zeros((size, size, 3), np.uint8)},
            joint_positions=np.zeros(0, np.float32),
            instruction="warm up",
            embodiment=loaded.default_key or sorted(loaded.checkpoint.norm_stats)[0],
            seed=0,
        )

    # --- prepare: camera -> image -> prompt ------------------------------------------------------

    def prepare(self, observation: base.Observation) -> base.PreparedSample:
        info = self.loaded.checkpoint
        key = self.unnorm_key(observation.embodiment)
        (image,) = CAMERAS(observation.images)
        assert image is not None  # required
        instruction = self.instruction(observation)
        self.check_joints(observation, key)  # unused by OpenVLA; only checked to be finite
        n_tokens = info.norm_stats[key].dim
        input_ids = self.tokenize(instruction)
        total = input_ids.shape[0] + info.config.num_patches + n_tokens
        if total > info.config.max_seq_len:
            raise base.InvalidObservation(
                "language_instruction",
                f"too long: {input_ids.shape[0]} prompt tokens + {info.config.num_patches} image tokens + "
                f"{n_tokens} action tokens exceed the model's {info.config.max_seq_len}",
            )
        inputs = OpenVLAInputs(
            pixels=preprocess_image(image, info.image),
            input_ids=input_ids,
            unnorm_key=key,
            n_tokens=n_tokens,
        )
        # Greedy decoding draws no noise: the seed is kept for the record only.
        return base.PreparedSample(
            inputs, key, base.sample_seed(observation), batch_key=("openvla", n_tokens)
        )

    # --- forward: greedy decoding, tokens -> normalised actions -------------------------------------

    def forward(self, samples: Sequence[base.PreparedSample]) -> list[Any]:
        if not samples:
            return []
        model = self.loaded.network
        inputs: list[OpenVLAInputs] = [s.inputs for s in samples]
        n_tokens = {i.n_tokens for i in inputs}
        if len(n_tokens) != 1:
            raise ValueError(
                f"samples in one batch must decode the same number of tokens, got {sorted(n_tokens)}"
            )
        pixels = torch.stack([i.pixels for i in inputs]).to(self.device, self.dtype)
        prompts = [i.input_ids for i in inputs]
        n = n_tokens.pop()
        runner = self.static
        if runner is not None and runner.fits(max(int(p.shape[0]) for p in prompts), n):
            out = runner.generate(pixels, prompts, n)
        else:
            with torch.inference_mode():
                out = model.generate(pixels, prompts, n)
        tokens, probs = out.tokens.cpu().numpy(), out.probs.float().cpu().numpy()
        return [decoded(tokens[b], probs[b], model.cfg) for b in range(len(inputs))]


# ---- OpenVLA-OFT ---------------------------------------------------------------------------------


def oft_choices(settings: base.ModelSettings) -> OFTChoices:
    """VLA_OFT_CHUNK_SIZE / VLA_OFT_NUM_IMAGES / VLA_OFT_NORMALIZATION (0 / auto: the checkpoint's)."""
    return OFTChoices(
        chunk_size=settings.oft_chunk_size or None,
        num_images=settings.oft_num_images or None,
        normalization=None if settings.oft_normalization == "auto" else settings.oft_normalization,
    )


def variant_class(path: Path, settings: base.ModelSettings) -> str:
    """The registry's detect for the openvla family: OpenVLA-OFT for VLA_OPENVLA_VARIANT=oft, or for
    `auto` when an action head file (converted or not) lies beside the merged weights; else ""."""
    variant = settings.openvla_variant
    if variant == "oft" or (variant == "auto" and is_oft_checkpoint(path)):
        return f"{__name__}:OpenVLAOFTPolicy"
    return ""


def oft_image(image: np.ndarray, spec: ImageSpec) -> torch.Tensor:
    """One camera frame (H, W, 3) uint8 -> (6, S, S): OFT's evaluation resize and centre crop, then
    the Prismatic processor as OpenVLA's."""
    return preprocess_image(oft_eval_image(image), spec)


class OpenVLAOFTPolicy(PrismaticPolicy[OFTLoaded]):
    compiled_name = "OFT forward"
    family_name = "OpenVLA-OFT"

    def load_checkpoint(self, path: str | None) -> OFTLoaded:
        where = base.checkpoint_dir(
            path,
            "OpenVLA-OFT",
            "the merged OpenVLA (config.json, model*.safetensors, tokenizer.model), dataset_statistics.json, "
            "action_head--*_checkpoint.safetensors, proprio_projector--*_checkpoint.safetensors",
        )
        info = read_oft_checkpoint(where, oft_choices(self.settings))
        cfg = info.config
        if self.settings.action_dim_set and self.settings.action_dim != cfg.action_dim:
            raise base.ModelLoadError(
                f"VLA_ACTION_DIM={self.settings.action_dim} but the checkpoint's action head "
                f"({info.head_file.name}) outputs {cfg.action_dim} dimensions"
            )
        datasets = sorted(info.actions)
        default = self.default_key(datasets)
        tokenizer = self.load_tokenizer(info.base)
        network = load_oft_model(info, self.device, self.dtype)
        cameras = OFT_CAMERAS[: cfg.num_images]
        rows = min(self.settings.chunk_size, cfg.chunk_size)
        vla = info.base.raw_config
        description = self.describe(
            info.base,
            datasets,
            default,
            action_dim=cfg.action_dim,
            chunk_size=rows,
            horizon=cfg.chunk_size,
            state_dims={name: cfg.proprio_dim for name in datasets} if cfg.proprio_dim else {},
            camera_names=cameras,
            image_size=(OFT_IMAGE_SIZE, OFT_IMAGE_SIZE),
            decode_size=(OFT_IMAGE_SIZE, OFT_IMAGE_SIZE),  # resized to it before the centre crop
            confidence_definition=OFT_CONFIDENCE_DEFINITION,
            description=(
                f"OpenVLA-OFT ({vla.get('vision_backbone_id', '?')} + {vla.get('llm_backbone_id', '?')}): "
                f"one bidirectional pass decodes a chunk of {cfg.chunk_size} actions x {cfg.action_dim} dims "
                f"in parallel through an L1 regression head, from {cfg.num_images} camera(s) "
                f"({', '.join(cameras)}), {cfg.proprio_dim} proprio values (joint_positions, "
                f"{info.normalization} normalisation) and the instruction. Real-time chunking does not "
                "apply: a regression head has no denoising steps to guide or inpaint."
            ),
        )
        logger.info(
            "loaded OpenVLA-OFT from %s on %s (%s): chunk %d x %d, proprio %d, %d image(s), %s; "
            "datasets: %s; default: %s",
            info.path,
            self.device,
            self.dtype,
            cfg.chunk_size,
            cfg.action_dim,
            cfg.proprio_dim,
            cfg.num_images,
            info.normalization,
            ", ".join(datasets),
            default or "(none: requests must name one)",
        )
        outputs = {
            name: ActionOutput(normalizer, rows, cfg.action_dim, cfg.action_dim)
            for name, normalizer in info.actions.items()
        }
        states = {name: StateInput(normalizer, cfg.proprio_dim) for name, normalizer in info.proprio.items()}
        camera_map = CameraMap(
            tuple(CameraSlot(name, required=True) for name in cameras), model="OpenVLA-OFT"
        )
        return OFTLoaded(network, description, tokenizer, default, outputs, info, camera_map, states)

    def static_runner(self, loaded: OFTLoaded) -> OFTStatic:
        return OFTStatic(loaded.network, STATIC_PROMPT_TOKENS, backend=self.settings.compile_backend)

    def warmup_observation(self) -> base.Observation:
        info = self.model_info
        frame = np.zeros((OFT_IMAGE_SIZE, OFT_IMAGE_SIZE, 3), np.uint8)
        embodiment = info.default_embodiment or info.embodiments[0]
        return base.Observation(
            images={name: frame for name in info.camera_names},
            joint_positions=np.zeros(info.state_dims.get(embodiment, 0), np.float32),
            instruction="warm up",
            embodiment=embodiment,
            seed=0,
        )

    def prepare(self, observation: base.Observation) -> base.PreparedSample:
        loaded = self.loaded
        key = self.unnorm_key(observation.embodiment)
        images = loaded.cameras(observation.images)
        instruction = self.instruction(observation)
        self.check_joints(observation, key)
        state = loaded.states.get(key)
        proprio = state(observation.joint_positions) if state is not None else np.zeros(0, np.float32)
        input_ids = self.tokenize(instruction)
        cfg = loaded.network.cfg
        total = cfg.sequence_len(input_ids.shape[0] - 1)
        if total > cfg.vla.max_seq_len:
            raise base.InvalidObservation(
                "language_instruction",
                f"too long: {input_ids.shape[0]} prompt tokens make a sequence of {total} tokens (images, "
                f"proprio and {cfg.num_action_tokens} action placeholders included), over the model's "
                f"{cfg.vla.max_seq_len}",
            )
        spec = loaded.checkpoint.base.image
        inputs = OFTInputs(
            pixels=torch.stack([oft_image(image, spec) for image in images if image is not None]),
            proprio=torch.from_numpy(proprio),
            input_ids=input_ids,
        )
        # A regression head draws no noise: the seed is kept for the record only.
        return base.PreparedSample(inputs, key, base.sample_seed(observation), batch_key="openvla-oft")

    def forward(self, samples: Sequence[base.PreparedSample]) -> list[Any]:
        if not samples:
            return []
        network = self.loaded.network
        inputs: list[OFTInputs] = [s.inputs for s in samples]
        pixels = torch.stack([i.pixels for i in inputs]).to(self.device, self.dtype)  # (B, I, 6, S, S)
        proprio = torch.stack([i.proprio for i in inputs]).to(self.device, self.dtype)  # (B, P)
        prompts = [i.input_ids for i in inputs]
        runner = self.static
        if runner is not None and runner.fits(max(int(p.shape[0]) for p in prompts)):
            actions = runner.predict(pixels, proprio, prompts)
        else:
            with torch.inference_mode():
                actions = network(OFTBatch(network.layout(pixels, prompts), proprio))
        chunks = actions.float().cpu().numpy()  # (B, chunk, D), normalised
        return [Raw(chunks[b], OFT_CONFIDENCE) for b in range(len(inputs))]
