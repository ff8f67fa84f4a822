"""Demonstrations as training batches for pi0, preprocessed exactly as the server preprocesses.

A sample is one step t of one episode: the camera frame and robot state before step t, the
episode's instruction, and the chunk of the expert's next H actions. Images, prompts and state
go through the policy's own preprocessing functions (models/pi0/policy.py), so training and
serving cannot drift apart. Normalisation statistics (openpi's norm_stats: mean, std, q01, q99)
come from the data, or from the checkpoint a fine-tuning run starts from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
import torch

from vla_inference.models.pi0.model import Pi0Batch, Pi0Config
from vla_inference.models.pi0.policy import image_to_model_input, tokenize_prompt
from vla_inference.preprocessing import normalize as nz
from vla_inference.sim import demos


@dataclass
class Batch:
    images: np.ndarray  # (B, N, 3, S, S) float32 in [-1, 1]; slot 0 = the camera, others masked
    image_masks: np.ndarray  # (B, N) bool
    tokens: np.ndarray  # (B, T) int64
    token_masks: np.ndarray  # (B, T) bool
    state: np.ndarray  # (B, A) float32, normalised and zero-padded
    actions: np.ndarray  # (B, H, A) float32, normalised and zero-padded

    def inputs(self) -> Pi0Batch:
        """The network's inputs (everything but the actions) as tensors sharing this memory."""
        return Pi0Batch(
            images=torch.from_numpy(self.images),
            image_masks=torch.from_numpy(self.image_masks),
            tokens=torch.from_numpy(self.tokens),
            token_masks=torch.from_numpy(self.token_masks),
            state=torch.from_numpy(self.state),
        )


def norm_stats(values: np.ndarray) -> dict[str, list[float]]:
    """openpi's statistics of one feature over rows of `values` (N, D)."""
    v = values.astype(np.float64)
    return {
        "mean": v.mean(0).tolist(),
        "std": v.std(0).tolist(),
        "q01": np.quantile(v, 0.01, axis=0).tolist(),
        "q99": np.quantile(v, 0.99, axis=0).tolist(),
    }


class DemoDataset:
    """All episodes of a demonstration directory in memory (frames stay JPEG until batched)."""

    def __init__(
        self, folder: Path, cfg: Pi0Config, tokenizer: Any, stats: dict[str, Any] | None = None
    ) -> None:
        """`stats` ({"state": ..., "actions": ...} in openpi's norm_stats layout) replaces the data's
        own statistics: a fine-tuned model keeps the normalisation it was trained with."""
        manifest = demos.read_manifest(folder)
        self.cfg = cfg
        self.manifest = manifest
        self.frames: list[bytes] = []
        states, actions, index = [], [], []
        self.chunk_starts: list[int] = []  # per sample: its first action's row in self.actions
        self.instructions: list[str] = []
        self.tokens: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        episodes = manifest["episodes"]
        assert isinstance(episodes, list)
        action_row = 0
        for record in episodes:
            arrays = demos.load_episode(folder, record)
            steps = len(arrays["state"])
            offsets, jpeg = arrays["jpeg_offsets"], arrays["jpeg"]
            self.frames += [jpeg[offsets[t] : offsets[t + 1]].tobytes() for t in range(steps)]
            states.append(arrays["state"])
            actions.append(arrays["action"])
            instruction = str(record["instruction"])
            if instruction not in self.tokens:
                self.tokens[instruction] = tokenize_prompt(tokenizer, cfg, instruction, None)
            self.instructions += [instruction] * steps
            self.chunk_starts += [action_row + t for t in range(steps)]
            index.append(steps)
            action_row += len(arrays["action"])
        self.state = np.concatenate(states)
        self.actions = np.concatenate(actions)
        self.stats = stats or {"state": norm_stats(self.state), "actions": norm_stats(self.actions)}
        self.state_norm = nz.Normalizer(nz.MEAN_STD, _stats(self.stats["state"]), nz.OPENPI)
        self.action_norm = nz.Normalizer(nz.MEAN_STD, _stats(self.stats["actions"]), nz.OPENPI)
        self.normalized_state = self.state_norm.normalize(self.state).astype(np.float32)
        self.normalized_actions = self.action_norm.normalize(self.actions).astype(np.float32)
        self.episode_count = len(episodes)

    def __len__(self) -> int:
        return len(self.frames)

    def batch(self, indices: np.ndarray) -> Batch:
        cfg = self.cfg
        size, slots, horizon, width = (
            cfg.vision.image_size,
            len(cfg.image_slots),
            cfg.action_horizon,
            cfg.action_dim,
        )
        B = len(indices)
        images = np.zeros((B, slots, 3, size, size), np.float32)
        image_masks = np.zeros((B, slots), bool)
        image_masks[:, 0] = True
        tokens = np.zeros((B, cfg.max_token_len), np.int64)
        token_masks = np.zeros((B, cfg.max_token_len), bool)
        state = np.zeros((B, width), np.float32)
        actions = np.zeros((B, horizon, width), np.float32)
        state_dim, action_dim = self.state.shape[1], self.actions.shape[1]
        for row, i in enumerate(indices):
            images[row, 0] = image_to_model_input(
                simplejpeg.decode_jpeg(self.frames[i], colorspace="RGB"), size
            )
            tokens[row], token_masks[row] = self.tokens[self.instructions[i]]
            state[row, :state_dim] = self.normalized_state[i]
            start = self.chunk_starts[i]
            actions[row, :, :action_dim] = self.normalized_actions[start : start + horizon]
        return Batch(images, image_masks, tokens, token_masks, state, actions)


def _stats(stats: dict[str, list[float]]) -> nz.Stats:
    return nz.Stats.of(stats)
