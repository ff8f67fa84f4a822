"""pi0-FAST's text conventions as LeRobot's pi0_fast trains and decodes them: the prompt in, the
action tokens out. Pure functions over a text tokenizer read as data (`tokenizer.json`).

Prompt (LeRobot processor_pi0_fast.py + TokenizerProcessorStep)::

    "Task: {task}, State: {s_1} {s_2} ...;\\n"     pi0.5's text (pi0/policy.py `state_prompt`)
    task = instruction.strip() with "_" and "\\n" replaced by spaces (case kept)
    s_i  = the normalised, unpadded state in 256 bins (pi0/policy.py `discretize_state`: below -1
           gives -1, from 1 - 2/256 up gives 255)
    ids  = [BOS] + tokens, right-padded with PAD to tokenizer_max_length (mask False)

At decode time LeRobot appends a second BOS after the padded prompt, inside the bidirectional
prefix (`decode_prefix`); the model then writes "Action: " + FAST tokens + "|" (+ EOS in training).
Decoding stops at "|" (LeRobot #4275; before, all max_decoding_steps tokens were generated).

Answer (`action_tokens`, LeRobot's detokenize_actions): the tokens must start "Action", ":"; they
are cut at the first "|"; every occurrence of the "Action: " token sequence is removed; what is left
are FAST tokens in PaliGemma ids (fast_tokenizer.text_to_fast_ids).

openpi differs (models/tokenizer.py FASTTokenizer, models/pi0_fast.py): the task is lower-cased and
only "_" is replaced; one BOS (none at decode time); decode positions skip one slot (the model's
`position_offset` 1); it stops on EOS; it decodes the text between "Action: " and "|" and re-encodes
it; zeros when "Action: " is missing; strict FAST decoding. Its checkpoints are JAX only.

Where this differs from LeRobot on purpose: a prompt longer than tokenizer_max_length is refused
(LeRobot truncates it silently, cutting the state); an answer without the "Action:" start (LeRobot:
AssertionError), without "|" within the budget (LeRobot decodes whatever came), with fewer DCT
coefficients than the chunk needs (LeRobot pads with zeros), or with a token that is not a FAST
token (LeRobot: zeros) raises FastDecodeError. More coefficients than the chunk needs are cut, as
LeRobot does (the chunk's own are all there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from vla_inference.models.base import InvalidObservation, ModelLoadError
from vla_inference.models.common.weights import read_json
from vla_inference.models.pi0.policy import state_prompt
from vla_inference.models.pi0_fast.fast_tokenizer import (
    FAST_SKIP_TOKENS,
    Decoded,
    FastDecodeError,
    FastTokenizer,
    text_to_fast_ids,
)

ACTION_PREFIX = "Action: "
END_OF_ACTION = "|"


class TextTokenizer:
    """A `tokenizers` tokenizer.json (LeRobot saves PaliGemma's as tokenizer/tokenizer.json) with
    the special ids from tokenizer_config.json beside it (defaults: Gemma's <bos>, <eos>, <pad>)."""

    def __init__(
        self, tokenizer: Tokenizer, bos: str = "<bos>", eos: str = "<eos>", pad: str = "<pad>"
    ) -> None:
        # transformers saves the padding / truncation of its last call into tokenizer.json (LeRobot's
        # has Fixed(tokenizer_max_length) padding): encode plain text, pad here
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        ids = {name: tokenizer.token_to_id(tok) for name, tok in (("bos", bos), ("eos", eos), ("pad", pad))}
        missing = [name for name, value in ids.items() if value is None]
        if missing:
            raise ModelLoadError(f"the text tokenizer has no {', '.join(missing)} token")
        self.bos_id, self.eos_id, self.pad_id = (int(ids[k] or 0) for k in ("bos", "eos", "pad"))
        # the base vocabulary (without added tokens): LeRobot's `tokenizer.vocab_size`, 257152 for PaliGemma
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=False)

    @classmethod
    def load(cls, path: Path) -> TextTokenizer:
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception type on malformed files
            raise ModelLoadError(f"{path} is not a tokenizers tokenizer.json: {exc}") from None
        config_path = path.parent / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}

        def name(key: str, default: str) -> str:
            value = config.get(key, default)
            if isinstance(value, dict):  # {"content": "<bos>", ...}
                value = value.get("content", default)
            return value if isinstance(value, str) else default

        specials = (name("bos_token", "<bos>"), name("eos_token", "<eos>"), name("pad_token", "<pad>"))
        return cls(tokenizer, *specials)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def token_id(self, token: str) -> int:
        found = self.tokenizer.token_to_id(token)
        if found is None:
            raise ModelLoadError(f"the text tokenizer has no token {token!r}")
        return int(found)

    def token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(int(token_id))


# ---- the prompt ---------------------------------------------------------------------------------


def tokenize_prompt(
    tokenizer: TextTokenizer, task: str, normalized_state: np.ndarray, max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """LeRobot's prompt as (max_length,) int64 ids and bool mask: [BOS] + text, right-padded with PAD.
    A prompt longer than max_length is refused (InvalidObservation), not truncated."""
    ids = [tokenizer.bos_id, *tokenizer.encode(state_prompt(task, normalized_state))]
    if len(ids) > max_length:
        raise InvalidObservation(
            "language_instruction",
            f"the prompt (instruction and state) is {len(ids)} tokens; this model takes at most "
            f"{max_length} (shorten the instruction)",
        )
    tokens = np.full(max_length, tokenizer.pad_id, dtype=np.int64)
    mask = np.zeros(max_length, dtype=bool)
    tokens[: len(ids)] = ids
    mask[: len(ids)] = True
    return tokens, mask


def decode_prefix(tokens: np.ndarray, mask: np.ndarray, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """LeRobot's decode-time prompt: the padded prompt (..., T) with a second BOS appended (..., T + 1)."""
    bos = np.full((*tokens.shape[:-1], 1), bos_id, dtype=np.int64)
    return (
        np.concatenate([tokens, bos], axis=-1),
        np.concatenate([mask, np.ones(bos.shape, dtype=bool)], axis=-1),
    )


# ---- the answer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionTokens:
    fast: np.ndarray  # (n,) int64 FAST token ids
    positions: np.ndarray  # (n,) int64 where they are in the decoded sequence


def action_tokens(ids: np.ndarray, tokenizer: TextTokenizer, skip: int = FAST_SKIP_TOKENS) -> ActionTokens:
    """A row's decoded ids (up to its stop token) -> its FAST tokens, by LeRobot's rules; a
    FastDecodeError says what is wrong with an answer that holds no action."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    words = [tokenizer.token(i) for i in ids[:2]]
    if words != ["Action", ":"]:
        raise FastDecodeError(f"the answer does not start with 'Action:' (it starts {words})")
    stop = np.flatnonzero(ids == tokenizer.token_id(END_OF_ACTION))
    if stop.size == 0:
        raise FastDecodeError("no end-of-action '|' within the decode budget")
    keep = np.ones(int(stop[0]), dtype=bool)
    prefix = np.asarray(tokenizer.encode(ACTION_PREFIX), dtype=np.int64)
    i = 0
    while prefix.size and i <= stop[0] - prefix.size:  # drop every "Action: " occurrence
        if keep[i : i + prefix.size].all() and np.array_equal(ids[i : i + prefix.size], prefix):
            keep[i : i + prefix.size] = False
            i += prefix.size
        else:
            i += 1
    positions = np.flatnonzero(keep)
    return ActionTokens(text_to_fast_ids(ids[positions], tokenizer.vocab_size, skip), positions)


@dataclass(frozen=True)
class Detokenized:
    actions: np.ndarray  # (horizon, action_dim) float32, normalised units
    confidence: float  # mean probability of the action tokens (nan when there are none)
    decoded: Decoded
    tokens: int  # FAST tokens read


def detokenize(
    ids: np.ndarray,
    probs: np.ndarray | None,
    text: TextTokenizer,
    fast: FastTokenizer,
    horizon: int,
    action_dim: int,
    skip: int = FAST_SKIP_TOKENS,
) -> Detokenized:
    """One row's decoded ids (and their probabilities) -> actions (horizon, action_dim), by LeRobot's
    rules, except that too few DCT coefficients are a FastDecodeError, not zeros."""
    found = action_tokens(ids, text, skip)
    decoded = fast.decode(found.fast, horizon, action_dim, relaxed=True)
    if decoded.padded:
        raise FastDecodeError(
            f"the answer holds {decoded.coefficients} of the {horizon * action_dim} DCT coefficients a "
            f"{horizon} x {action_dim} chunk needs ({found.fast.size} FAST tokens)"
        )
    confidence = float("nan")
    if probs is not None:
        confidence = float(np.asarray(probs, dtype=np.float64)[found.positions].mean())
    return Detokenized(decoded.actions, confidence, decoded, int(found.fast.size))
