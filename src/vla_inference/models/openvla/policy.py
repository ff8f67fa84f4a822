"""OpenVLA 7B behind the VLAModel contract.

prepare   one "base" camera image -> 224 px (checkpoint's resize strategy, bicubic) -> two
          normalisations (DINOv2 ImageNet mean/std, SigLIP 0.5/0.5) stacked to (6, 224, 224);
          prompt "In: What action should the robot take to {instruction.lower()}?\\nOut:" ->
          [BOS] + SentencePiece ids, + 29871 ("▁") when the prompt does not already end with it.
forward   batched greedy decoding of action_dim tokens (left padding, per-sample positions);
          with VLA_COMPILE the static-shape decoder (model.OpenVLAStatic: prompts padded to
          STATIC_PROMPT_TOKENS, a KV cache per batch bucket, compiled prefill and decode step);
          a longer prompt is decoded eagerly.
finish    token -> bin centre -> un-normalised with the dataset's q01/q99 (masked dimensions pass).

Embodiments are the datasets in norm_stats (the reference's `unnorm_key`). A request's
embodiment_tag picks one; an empty tag takes VLA_NORM_STATS_KEY, else the only dataset, and
is refused, listing the datasets, when the checkpoint has several and no default is set.

OpenVLA conditions on the image and the instruction only: joint_positions are not used, any
number of finite values is accepted (state_dims is empty). The model predicts one action per
step: horizon 1, chunk size 1. Decoding is greedy, so the request seed changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from vla_inference.models import base
from vla_inference.models.common import static
from vla_inference.models.common.tokenizers import find_tokenizer, load_sentencepiece
from vla_inference.models.common.weights import resolve_dtype
from vla_inference.models.openvla.checkpoint import (
    TOKENIZER_FILE,
    ActionStats,
    CheckpointInfo,
    ImageSpec,
    load_model,
    read_checkpoint,
)
from vla_inference.models.openvla.model import STATIC_PROMPT_TOKENS, OpenVLA, OpenVLAStatic

logger = logging.getLogger(__name__)

CAMERA = "base"
SPACE_TOKEN = 29871  # Llama-2 "▁": the reference appends it after "Out:" (as seen in training)
PROMPT = "In: What action should the robot take to {}?\nOut:"
CONFIDENCE_DEFINITION = (
    "geometric mean over the action_dim greedily decoded action tokens of each token's softmax "
    "probability (over the full vocabulary)"
)


@dataclass(frozen=True)
class OpenVLAInputs:
    pixels: torch.Tensor  # (6, S, S) float32: DINOv2-normalised RGB, then SigLIP-normalised RGB
    input_ids: torch.Tensor  # (L,) int64: BOS, prompt, 29871
    unnorm_key: str
    n_tokens: int  # action dimensions to decode


@dataclass(frozen=True)
class OpenVLARaw:
    tokens: np.ndarray  # (n,) int64
    probs: np.ndarray  # (n,) float32


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


def unnormalize(normalized: np.ndarray, stats: ActionStats) -> np.ndarray:
    """[-1, 1] -> robot units with q01/q99; dimensions whose mask is False pass through unchanged."""
    return np.where(stats.mask, 0.5 * (normalized + 1.0) * (stats.q99 - stats.q01) + stats.q01, normalized)


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


class OpenVLAPolicy(base.VLAModel):
    model_type: ClassVar[str] = "openvla"

    def __init__(self, settings: object) -> None:
        super().__init__(settings)
        self._info: CheckpointInfo | None = None
        self._model: OpenVLA | None = None
        self._tokenizer: Any = None
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._default = ""
        self._description: base.ModelDescription | None = None
        self._static: OpenVLAStatic | None = None  # VLA_COMPILE
        self._static_warm = False

    # --- loading ----------------------------------------------------------------------------

    def load(self, checkpoint_path: str | None, device: str) -> None:
        path = base.checkpoint_dir(
            checkpoint_path, "OpenVLA", "config.json, model*.safetensors, tokenizer.model"
        )
        info = read_checkpoint(path)
        key = self.settings.norm_stats_key.strip()
        datasets = sorted(info.norm_stats)
        if key and key not in info.norm_stats:
            raise base.ModelLoadError(
                f"VLA_NORM_STATS_KEY={key!r} is not in the checkpoint; available: {', '.join(datasets)}"
            )
        self._default = key or (datasets[0] if len(datasets) == 1 else "")
        tokenizer_file = find_tokenizer(
            info.path,
            self.settings.tokenizer_path,
            TOKENIZER_FILE,
            "OpenVLA needs the Llama-2 SentencePiece tokenizer.model of openvla/openvla-7b.",
        )
        self._tokenizer = load_sentencepiece(tokenizer_file, info.config.vocab_size)
        self._device = torch.device(device)
        self._dtype = resolve_dtype(self.settings.dtype, self._device)
        self._model = load_model(info, self._device, self._dtype)
        self._info = info
        if self.settings.compile:
            most_tokens = max(stats.dim for stats in info.norm_stats.values())
            self._static = OpenVLAStatic(self._model, STATIC_PROMPT_TOKENS, most_tokens)
        action_dim = info.norm_stats[self._default or datasets[0]].dim
        self._description = base.ModelDescription(
            name=info.path.name,
            version="+".join(
                str(info.raw_config.get(k, "?")) for k in ("vision_backbone_id", "llm_backbone_id")
            ),
            family="openvla",
            action_dim=action_dim,
            chunk_size=1,
            horizon=1,
            embodiments=tuple(datasets),
            default_embodiment=self._default,
            state_dims={},
            camera_names=(CAMERA,),
            image_size=(info.image.size, info.image.size),
            decode_size=(info.image.size, info.image.size),
            device=str(self._device),
            dtype=str(self._dtype).removeprefix("torch."),
            confidence_definition=CONFIDENCE_DEFINITION,
        )
        logger.info(
            "loaded OpenVLA from %s on %s (%s); datasets: %s; default: %s",
            info.path,
            self._device,
            self._dtype,
            ", ".join(datasets),
            self._default or "(none: requests must name one)",
        )

    def _loaded(self) -> tuple[CheckpointInfo, OpenVLA]:
        if self._info is None or self._model is None:
            raise RuntimeError("OpenVLAPolicy.load() has not been called")
        return self._info, self._model

    @property
    def model_info(self) -> base.ModelDescription:
        if self._description is None:
            raise RuntimeError("OpenVLAPolicy.load() has not been called")
        return self._description

    def warmup_observation(self) -> base.Observation:
        info, _ = self._loaded()
        size = info.image.size
        return base.Observation(
            images={CAMERA: np.zeros((size, size, 3), np.uint8)},
            joint_positions=np.zeros(0, np.float32),
            instruction="warm up",
            embodiment=self._default or sorted(info.norm_stats)[0],
            seed=0,
        )

    # --- the three stages -------------------------------------------------------------------

    def tokenize(self, instruction: str) -> torch.Tensor:
        """Instruction -> (L,) int64 ids: [BOS] + prompt + 29871 (when missing)."""
        ids = self._tokenizer.encode(PROMPT.format(instruction.lower()))
        bos = self._tokenizer.bos_id()
        ids = [bos if bos >= 0 else 1, *ids]
        if ids[-1] != SPACE_TOKEN:
            ids.append(SPACE_TOKEN)
        return torch.tensor(ids, dtype=torch.long)

    def unnorm_key(self, tag: str) -> str:
        info, _ = self._loaded()
        key = self.resolve_embodiment(tag)
        if not key:
            raise base.InvalidObservation(
                "embodiment_tag",
                "this OpenVLA checkpoint has statistics for several datasets; name one as embodiment_tag "
                f"(or set VLA_NORM_STATS_KEY): {', '.join(sorted(info.norm_stats))}",
            )
        return key

    def prepare(self, observation: base.Observation) -> base.PreparedSample:
        info, _ = self._loaded()
        key = self.unnorm_key(observation.embodiment)
        names = set(observation.images)
        if names != {CAMERA}:
            got = ", ".join(sorted(names)) or "none"
            raise base.InvalidObservation(
                "cameras", f"OpenVLA takes exactly one camera named {CAMERA!r}; got: {got}"
            )
        image = observation.images[CAMERA]
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise base.InvalidObservation(
                "cameras", f"camera {CAMERA!r} must be (H, W, 3) uint8 RGB, got {image.shape}"
            )
        instruction = observation.instruction.strip()
        if not instruction:
            raise base.InvalidObservation("language_instruction", "OpenVLA needs a language instruction")
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

    def forward(self, samples: Sequence[base.PreparedSample]) -> list[OpenVLARaw]:
        _, model = self._loaded()
        if not samples:
            return []
        inputs: list[OpenVLAInputs] = [s.inputs for s in samples]
        n_tokens = {i.n_tokens for i in inputs}
        if len(n_tokens) != 1:
            raise ValueError(
                f"samples in one batch must decode the same number of tokens, got {sorted(n_tokens)}"
            )
        pixels = torch.stack([i.pixels for i in inputs]).to(self._device, self._dtype)
        prompts = [i.input_ids for i in inputs]
        n = n_tokens.pop()
        runner = self._static
        if runner is not None and runner.fits(max(int(p.shape[0]) for p in prompts), n):
            if not self._static_warm:
                self._warm_up(runner, pixels, prompts, n)
            out = runner.generate(pixels, prompts, n)
        else:
            with torch.inference_mode():
                out = model.generate(pixels, prompts, n)
        tokens, probs = out.tokens.cpu().numpy(), out.probs.float().cpu().numpy()
        return [OpenVLARaw(tokens=tokens[b], probs=probs[b]) for b in range(len(inputs))]

    def _warm_up(
        self, runner: OpenVLAStatic, pixels: torch.Tensor, prompts: list[torch.Tensor], n: int
    ) -> None:
        """Compile every bucket up to VLA_BATCH_SIZE on the first forward (the engine's warm-up),
        with copies of the batch's first sample, so no later request waits for a compile."""

        def run(bucket: int) -> None:
            runner.generate(static.pad_rows(pixels[:1], bucket), prompts[:1] * bucket, n)

        static.warm_up("OpenVLA decoder", static.buckets_up_to(self.settings.batch_size), run)
        self._static_warm = True

    def finish(self, raw: OpenVLARaw, sample: base.PreparedSample) -> base.ActionPrediction:
        info, model = self._loaded()
        inputs: OpenVLAInputs = sample.inputs
        normalized = detokenize(raw.tokens, model.cfg.action_vocab_size, model.cfg.n_action_bins)
        actions = unnormalize(normalized, info.norm_stats[inputs.unnorm_key])
        probs = np.clip(raw.probs.astype(np.float64), 1e-30, 1.0)
        confidence = float(np.exp(np.mean(np.log(probs))))
        return base.ActionPrediction(
            actions=actions[None].astype(np.float32), confidence=min(max(confidence, 0.0), 1.0)
        )
