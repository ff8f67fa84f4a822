"""OpenVLA 7B behind the VLAModel contract.

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
from vla_inference.models.common.tokenizers import find_tokenizer, load_sentencepiece
from vla_inference.models.openvla.checkpoint import (
    TOKENIZER_FILE,
    CheckpointInfo,
    ImageSpec,
    load_model,
    read_checkpoint,
)
from vla_inference.models.openvla.model import STATIC_PROMPT_TOKENS, OpenVLA, OpenVLAConfig
from vla_inference.models.openvla.static import OpenVLAStatic
from vla_inference.models.policy import Loaded, Policy, Raw
from vla_inference.preprocessing.steps import ActionOutput, CameraMap, CameraSlot

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


@dataclass
class OpenVLALoaded(Loaded[OpenVLA]):
    checkpoint: CheckpointInfo
    tokenizer: Any
    default_key: str  # "" = requests must name the dataset
    outputs: dict[str, ActionOutput]  # dataset (unnorm_key) -> action step


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


class OpenVLAPolicy(Policy[OpenVLALoaded]):
    model_type: ClassVar[str] = "openvla"
    compiled_name = "decoder"

    # --- loading ----------------------------------------------------------------------------

    def load_checkpoint(self, path: str | None) -> OpenVLALoaded:
        where = base.checkpoint_dir(path, "OpenVLA", "config.json, model*.safetensors, tokenizer.model")
        info = read_checkpoint(where)
        key = self.settings.norm_stats_key.strip()
        datasets = sorted(info.norm_stats)
        if key and key not in info.norm_stats:
            raise base.ModelLoadError(
                f"VLA_NORM_STATS_KEY={key!r} is not in the checkpoint; available: {', '.join(datasets)}"
            )
        default = key or (datasets[0] if len(datasets) == 1 else "")
        tokenizer_file = find_tokenizer(
            info.path,
            self.settings.tokenizer_path,
            TOKENIZER_FILE,
            "OpenVLA needs the Llama-2 SentencePiece tokenizer.model of openvla/openvla-7b.",
        )
        tokenizer = load_sentencepiece(tokenizer_file, info.config.vocab_size)
        network = load_model(info, self.device, self.dtype)
        action_dim = info.norm_stats[default or datasets[0]].dim
        description = base.ModelDescription(
            name=info.path.name,
            version="+".join(
                str(info.raw_config.get(k, "?")) for k in ("vision_backbone_id", "llm_backbone_id")
            ),
            family="openvla",
            action_dim=action_dim,
            chunk_size=1,
            horizon=1,
            embodiments=tuple(datasets),
            default_embodiment=default,
            state_dims={},
            camera_names=(CAMERA,),
            image_size=(info.image.size, info.image.size),
            decode_size=(info.image.size, info.image.size),
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
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
        return OpenVLALoaded(network, description, info, tokenizer, default, outputs)

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
                "this OpenVLA checkpoint has statistics for several datasets; name one as embodiment_tag "
                f"(or set VLA_NORM_STATS_KEY): {', '.join(sorted(self.loaded.checkpoint.norm_stats))}",
            )
        return key

    def prepare(self, observation: base.Observation) -> base.PreparedSample:
        info = self.loaded.checkpoint
        key = self.unnorm_key(observation.embodiment)
        (image,) = CAMERAS(observation.images)
        assert image is not None  # required
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

    # --- postprocess ------------------------------------------------------------------------

    def postprocess(self, actions: np.ndarray, sample: base.PreparedSample) -> np.ndarray:
        return self.loaded.outputs[sample.embodiment](actions)
