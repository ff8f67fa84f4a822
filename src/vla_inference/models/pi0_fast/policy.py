"""Pi0FastPolicy: serves LeRobot pi0_fast checkpoints in the pi0 family (VLA_MODEL_TYPE=pi0; the
checkpoint's config.json "type": "pi0_fast" picks this class, models/registry.py).

prepare   cameras (CameraMap: the checkpoint's image features; base_0_rgb / left_wrist_0_rgb /
          right_wrist_0_rgb answer to base / left_wrist / right_wrist as in pi0, other names keep
          theirs; LeRobot's empty_camera_<i> fillers are left out: a masked slot changes nothing)
          -> images resized with padding to 224 and scaled to [-1, 1] (pi0's) -> the state
          normalised in float32 with the checkpoint's statistics (LeRobot's MEAN_STD by default) ->
          LeRobot's prompt "Task: ..., State: <256 bins>;\\n" (prompt.py), padded to
          tokenizer_max_length, then the decode-time BOS.
forward   one batched decode (model.py): greedy, or temperature sampling with each row's noise from
          its own seed; each row stops on its own at "|"; at most VLA_FAST_MAX_TOKENS tokens (else
          the checkpoint's max_decoding_steps). With VLA_COMPILE the static runner (static.py).
          Each row's tokens -> FAST tokens -> the DCT coefficients -> the chunk (chunk_size x
          action_dim) in normalised units, with its confidence (CONFIDENCE_DEFINITION).
finish    un-normalised with the checkpoint's action statistics, the first min(VLA_CHUNK_SIZE,
          chunk_size) actions.

A row whose answer holds no action (no "Action:" start, no "|" within the budget, fewer DCT
coefficients than the chunk needs, a token that is not a FAST token) is answered alone with an
error (`finish` raises NoValidAction: INTERNAL with the reason); the other rows of its batch are
answered, and the batch is not run again. Never zeros, LeRobot's fallback.

The horizon: the model writes the chunk it was trained on, chunk_size steps. LeRobot decodes with
n_action_steps as the horizon instead; when a config sets n_action_steps < chunk_size that reads
the first n_action_steps x action_dim coefficients of a chunk_size-step DCT as an
n_action_steps-step DCT, which is not the trained chunk. This server decodes chunk_size steps (a
warning at load says when the two differ); ModelInfo's model_horizon is chunk_size.

Real-time chunking does not apply: the chunk is decoded token by token from the observation, with
no denoising to inpaint or guide (rtc_methods is empty; an rtc request is refused by the base).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from vla_inference.models import base
from vla_inference.models.common import static
from vla_inference.models.pi0.policy import SLOT_TO_CAMERA, image_to_model_input
from vla_inference.models.pi0_fast import checkpoint as ckpt
from vla_inference.models.pi0_fast.fast_tokenizer import FastDecodeError, FastTokenizer
from vla_inference.models.pi0_fast.model import Pi0FastBatch, Pi0FastModel, Rules, row_key
from vla_inference.models.pi0_fast.prompt import (
    END_OF_ACTION,
    TextTokenizer,
    decode_prefix,
    detokenize,
    tokenize_prompt,
)
from vla_inference.models.pi0_fast.static import Pi0FastStatic
from vla_inference.models.policy import Loaded, Policy, Raw
from vla_inference.preprocessing.steps import ActionOutput, CameraMap, CameraSlot, StateInput

log = logging.getLogger(__name__)

FAMILY = "pi0_fast"
EMPTY_CAMERA = "empty_camera_"
CONFIDENCE_DEFINITION = (
    "mean, over the decoded FAST action tokens (the answer without its 'Action: ' start and '|' "
    "end), of each token's softmax probability under the model (temperature 1); in [0, 1]"
)
CHECKPOINT_CONTENTS = (
    "LeRobot's pi0_fast save: config.json with type pi0_fast, model.safetensors, the normalizer "
    "files, tokenizer/ and action_tokenizer/"
)


@dataclass(frozen=True)
class Pi0FastInputs:
    """One prepared sample (a Pi0FastBatch row, as numpy)."""

    images: np.ndarray  # (N, 3, S, S) float32 in [-1, 1]
    image_masks: np.ndarray  # (N,) bool
    tokens: np.ndarray  # (T,) int64: the prompt right-padded to tokenizer_max_length, then BOS
    token_mask: np.ndarray  # (T,) bool
    prompt_tokens: int  # valid prompt tokens before the padding (BOS included, decode BOS not)


@dataclass
class Pi0FastLoaded(Loaded[Pi0FastModel]):
    checkpoint: ckpt.Checkpoint
    text: TextTokenizer
    fast: FastTokenizer
    cameras: CameraMap  # the cameras served, one image slot each
    state: StateInput  # joints -> the normalised (unpadded) state the prompt discretises
    output: ActionOutput  # the normalised chunk -> the robot's actions
    rules: Rules
    budget: int  # tokens a decode writes at most


@dataclass(frozen=True)
class FastRaw(Raw):
    """A decoded chunk, with the tokens the row wrote (up to its stop) for the record."""

    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass(frozen=True)
class Undecodable:
    """A row whose answer holds no action: why, and the tokens it wrote."""

    reason: str
    tokens: np.ndarray


class Pi0FastPolicy(Policy[Pi0FastLoaded]):
    model_type = "pi0"
    compiled_name = "decoder"

    # ---- loading -----------------------------------------------------------------------------

    def load_checkpoint(self, path: str | None) -> Pi0FastLoaded:
        where = base.checkpoint_dir(path, "pi0-FAST", CHECKPOINT_CONTENTS)
        settings = self.settings
        checkpoint = ckpt.load(
            where, tokenizer_path=settings.tokenizer_path, fast_tokenizer_path=settings.fast_tokenizer_path
        )
        cfg = checkpoint.config
        text = TextTokenizer.load(checkpoint.text_tokenizer)
        fast = FastTokenizer.load(checkpoint.action_tokenizer)
        lowest = text.vocab_size - checkpoint.fast_skip_tokens - fast.vocab_size
        if text.vocab_size > cfg.vocab_size or lowest < 0:
            raise base.ModelLoadError(
                f"{checkpoint.text_tokenizer}: its {text.vocab_size} tokens (less "
                f"{checkpoint.fast_skip_tokens} skipped) cannot hold the {fast.vocab_size} FAST tokens of "
                f"{checkpoint.action_tokenizer} within the model's vocabulary of {cfg.vocab_size}"
            )
        action_dim = checkpoint.action_dim
        if settings.action_dim_set and settings.action_dim != action_dim:
            raise base.ModelLoadError(
                f"VLA_ACTION_DIM={settings.action_dim} but {where}/config.json's action feature has "
                f"{action_dim} dimensions"
            )
        if checkpoint.n_action_steps != checkpoint.chunk_size:
            log.warning(
                "%s: n_action_steps=%d but chunk_size=%d: LeRobot decodes the FAST tokens as a %d-step "
                "chunk, which is not the chunk the model was trained to write; this server decodes the "
                "trained %d steps and returns the first min(VLA_CHUNK_SIZE, %d)",
                where / "config.json",
                checkpoint.n_action_steps,
                checkpoint.chunk_size,
                checkpoint.n_action_steps,
                checkpoint.chunk_size,
                checkpoint.chunk_size,
            )
        if checkpoint.norms is None:
            log.warning("%s has no normalizer statistics: states and actions pass unchanged", where)
        state_norm, action_norm = checkpoint.norms or (None, None)
        network = ckpt.load_model(checkpoint, self.device, self.dtype)
        budget = settings.fast_max_tokens or checkpoint.max_decoding_steps
        temperature = (
            checkpoint.temperature if settings.fast_temperature is None else settings.fast_temperature
        )
        rules = Rules(text.token_id(END_OF_ACTION), text.pad_id, temperature)
        horizon = checkpoint.chunk_size
        chunk = min(settings.chunk_size, horizon)
        embodiment = settings.norm_stats_key or "default"
        cameras = tuple(
            SLOT_TO_CAMERA.get(slot, slot)
            for slot in checkpoint.image_slots
            if not slot.startswith(EMPTY_CAMERA)
        )
        size = checkpoint.image_size
        decoding = "greedy" if temperature <= 0 else f"sampled at temperature {temperature:g}"
        description = base.ModelDescription(
            name=f"pi0-FAST {where.name} (LeRobot format)",
            version=hashlib.sha256(f"{where.resolve()}|{cfg}".encode()).hexdigest()[:12],
            family=FAMILY,
            action_dim=action_dim,
            chunk_size=chunk,
            horizon=horizon,
            embodiments=(embodiment,),
            default_embodiment=embodiment,
            state_dims={embodiment: checkpoint.state_dim},
            camera_names=cameras,
            image_size=(size, size),
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            confidence_definition=CONFIDENCE_DEFINITION,
            description=(
                f"{checkpoint.describe()}: autoregressive, the chunk written as FAST tokens (a DCT of "
                f"the chunk), {decoding}, at most {budget} tokens a request. Real-time chunking does "
                "not apply (no denoising to inpaint or guide): rtc_methods is empty."
            ),
            rtc_methods=(),
            decode_size=(size, size),
        )
        log.info(
            "loaded %s from %s on %s (%s): %s, budget %d tokens, cameras %s",
            checkpoint.describe(),
            where,
            self.device,
            self.dtype,
            decoding,
            budget,
            ", ".join(cameras),
        )
        return Pi0FastLoaded(
            network=network,
            description=description,
            checkpoint=checkpoint,
            text=text,
            fast=fast,
            cameras=CameraMap(tuple(CameraSlot(c) for c in cameras), model="this pi0-FAST checkpoint"),
            state=StateInput(state_norm, checkpoint.state_dim),
            output=ActionOutput(action_norm, chunk, action_dim, action_dim),
            rules=rules,
            budget=budget,
        )

    def static_runner(self, loaded: Pi0FastLoaded) -> Pi0FastStatic:
        """Every served camera's slot, the whole padded prompt and its decode BOS, the budget."""
        return Pi0FastStatic(
            loaded.network,
            slots=len(loaded.cameras.slots),
            prompt_len=loaded.checkpoint.tokenizer_max_length + 1,
            budget=loaded.budget,
            backend=self.settings.compile_backend,
        )

    def warm_up(self, max_batch: int) -> None:
        """Compile and capture prefill and decode step for every bucket (three tokens without the
        early stop, so the step runs whatever the warm-up observation's answer)."""
        if self.static is None:
            return
        runner, rules = self.static, self.loaded.rules
        batch = self.collate([self.prepare(self.warmup_observation())], trim=False)

        def run(bucket: int) -> object:
            rows = pytree.tree_map_only(Tensor, lambda t: static.pad_rows(t, bucket), batch)
            return runner.generate(rows, rules, stop_early=False, limit=3)

        static.warm_up(f"{FAMILY} {self.compiled_name}", static.buckets_up_to(max_batch), run)

    # ---- prepare: cameras -> images -> state -> prompt ------------------------------------------

    def prepare(self, observation: base.Observation) -> base.PreparedSample:
        loaded = self.loaded
        embodiment = self.resolve_embodiment(observation.embodiment)
        self.check_joints(observation, embodiment)
        size = loaded.checkpoint.image_size
        found = loaded.cameras(observation.images)
        images = np.zeros((len(found), 3, size, size), np.float32)
        masks = np.zeros(len(found), bool)
        for slot, image in enumerate(found):
            if image is not None:
                image_to_model_input(image, size, out=images[slot])
                masks[slot] = True
        state = loaded.state.normalized(observation.joint_positions)  # float32, as LeRobot's
        tokens, mask = tokenize_prompt(
            loaded.text, observation.instruction, state, loaded.checkpoint.tokenizer_max_length
        )
        prompt_tokens = int(mask.sum())
        tokens, mask = decode_prefix(tokens, mask, loaded.text.bos_id)
        inputs = Pi0FastInputs(images, masks, tokens, mask, prompt_tokens)
        return base.PreparedSample(inputs, embodiment, base.sample_seed(observation), batch_key=(FAMILY,))

    # ---- forward: one batched decode, tokens -> chunks -------------------------------------------

    def collate(self, samples: Sequence[base.PreparedSample], trim: bool = True) -> Pi0FastBatch:
        """The samples as one batch on the device. `trim` (eager): the image slots no row has and the
        prompt padding after the longest prompt are left out (masked everywhere: an exact shortcut);
        else every slot and the whole padded prompt (the static runner's lengths)."""
        inputs: list[Pi0FastInputs] = [s.inputs for s in samples]
        masks = np.stack([i.image_masks for i in inputs])
        tokens = np.stack([i.tokens for i in inputs])
        token_masks = np.stack([i.token_mask for i in inputs])
        slots = np.arange(masks.shape[1])
        if trim:
            slots = np.flatnonzero(masks.any(axis=0))
            used = max(i.prompt_tokens for i in inputs)
            columns = np.r_[0:used, tokens.shape[1] - 1]  # the prompts, then the decode BOS
            tokens, token_masks = tokens[:, columns], token_masks[:, columns]
        images = np.stack([i.images[slots] for i in inputs])

        def device(array: np.ndarray, dtype: torch.dtype) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(device=self.device, dtype=dtype)

        return Pi0FastBatch(
            images=device(images, self.dtype),
            image_masks=device(masks[:, slots], torch.bool),
            tokens=device(tokens, torch.long),
            token_masks=device(token_masks, torch.bool),
            seeds=device(np.array([row_key(s.seed) for s in samples], np.int64), torch.long),
        )

    def forward(self, samples: Sequence[base.PreparedSample]) -> list[Any]:
        if not samples:
            return []
        loaded = self.loaded
        if self.static is not None:
            out = self.static.generate(self.collate(samples, trim=False), loaded.rules)
        else:
            out = loaded.network.generate(self.collate(samples), loaded.rules, loaded.budget)
        tokens, probs = out.tokens.cpu().numpy(), out.probs.float().cpu().numpy()
        lengths, stopped = out.lengths.cpu().tolist(), out.stopped.cpu().tolist()
        return [
            self.answer(tokens[i, :n], probs[i, :n], stop)
            for i, (n, stop) in enumerate(zip(lengths, stopped, strict=True))
        ]

    def answer(self, tokens: np.ndarray, probs: np.ndarray, stopped: bool) -> FastRaw | Undecodable:
        """One row's written tokens (up to its stop) -> its chunk and confidence, or why it has none."""
        loaded = self.loaded
        checkpoint = loaded.checkpoint
        if not stopped:
            return self._undecodable(
                f"no end-of-action '|' within the budget of {loaded.budget} tokens (VLA_FAST_MAX_TOKENS, "
                "else the checkpoint's max_decoding_steps)",
                tokens,
            )
        try:
            found = detokenize(
                tokens,
                probs,
                loaded.text,
                loaded.fast,
                checkpoint.chunk_size,
                checkpoint.action_dim,
                checkpoint.fast_skip_tokens,
            )
        except FastDecodeError as exc:
            return self._undecodable(str(exc), tokens)
        return FastRaw(found.actions, min(max(found.confidence, 0.0), 1.0), tokens=tokens)

    def _undecodable(self, reason: str, tokens: np.ndarray) -> Undecodable:
        again = (
            "greedy decoding: the same observation gets the same answer"
            if self.loaded.rules.temperature <= 0
            else "sampled: another seed may decode"
        )
        log.debug("pi0-FAST answer without an action (%s): %s", reason, tokens.tolist())
        return Undecodable(f"pi0-FAST wrote no action: {reason} ({again})", tokens)

    # ---- finish ------------------------------------------------------------------------------

    def finish(self, raw: Any, sample: base.PreparedSample) -> base.ActionPrediction:
        if isinstance(raw, Undecodable):
            raise base.NoValidAction(raw.reason)
        return super().finish(raw, sample)

    def postprocess(self, actions: np.ndarray, sample: base.PreparedSample) -> np.ndarray:
        return self.loaded.output(actions)


__all__ = ["CONFIDENCE_DEFINITION", "FastRaw", "Pi0FastPolicy", "Undecodable"]
