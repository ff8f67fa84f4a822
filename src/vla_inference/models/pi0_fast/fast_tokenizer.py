"""The FAST action tokenizer (Pertsch et al. 2025), without the remote code it is published with.

A FAST tokenizer directory (LeRobot saves one as `action_tokenizer/` in the checkpoint; the Hub's
`physical-intelligence/fast` and `lerobot/fast-action-tokenizer` have the same layout)::

    processor_config.json        {"scale", "min_token", "vocab_size", "time_horizon", "action_dim",
                                  "auto_map", "processor_class"}: only the numbers are read
    bpe_tokenizer/tokenizer.json  a byte-level BPE (`tokenizers`), loaded as data
    processing_action_tokenizer.py   the publisher's code: never imported or executed

Encoding an action chunk x (H, D):

    c = DCT-II(x) over time, orthonormal     (H, D) float64
    q = round(c * scale), flattened row-major (H * D,) ints: all dims of step 0, then step 1, ...
    s = "".join(chr(max(q_i - min_token, 0)))
    ids = BPE(s)                             FAST token ids in [0, vocab_size)

Decoding inverts it: BPE-decode to s, q_i = ord(s_i) + min_token, reshape (H, D), x = DCT-III(q /
scale) (the orthonormal inverse). LeRobot decodes "relaxed": the coefficient list is zero-padded or
truncated to H * D before the reshape (the publisher's decode refuses any other length); both are
here (`relaxed`), and the result says how many coefficients were padded or cut.

PaliGemma sees FAST token f as text id `vocab - 1 - skip - f` (skip = 128: the last 128 ids are
PaliGemma's <seg> tokens; vocab = the text tokenizer's base vocabulary, 257152 for PaliGemma):
`fast_to_text_ids` / `text_to_fast_ids`.

Errors are FastDecodeError (a token outside the FAST vocabulary, text that is not valid UTF-8),
never silent zeros: the publisher's decode and LeRobot's return zeros there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from vla_inference.models.base import ModelLoadError
from vla_inference.models.common.weights import read_json

CONFIG_FILE = "processor_config.json"
BPE_DIR = "bpe_tokenizer"
BPE_FILE = "tokenizer.json"
FAST_SKIP_TOKENS = 128  # PaliGemma's last 128 ids (<seg000>..<seg127>) are never FAST tokens
HELP = (
    "pi0-FAST needs its FAST action tokenizer directory (processor_config.json and "
    "bpe_tokenizer/tokenizer.json): LeRobot saves it as action_tokenizer/ in the checkpoint; for older "
    "checkpoints set VLA_FAST_TOKENIZER_PATH to a copy of the one named by config.json "
    "action_tokenizer_name (default lerobot/fast-action-tokenizer)."
)
# transformers' clean_up_tokenization (applied by its decode when the tokenizer config asks for it)
_CLEAN_UP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


class FastDecodeError(ValueError):
    """A FAST token sequence that does not decode to an action chunk."""


# ---- the orthonormal DCT ------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix C (n, n), float64: C[k, t] = s_k cos(pi (2t + 1) k / 2n),
    s_0 = sqrt(1/n), s_k = sqrt(2/n). dct(x) = C @ x over time; C is orthogonal, so the inverse
    (the orthonormal DCT-III) is C.T @ y."""
    k = np.arange(n, dtype=np.float64)[:, None]
    t = np.arange(n, dtype=np.float64)[None, :]
    c = np.cos(np.pi * (2.0 * t + 1.0) * k / (2.0 * n)) * np.sqrt(2.0 / n)
    c[0] *= np.sqrt(0.5)
    c.setflags(write=False)
    return c


def dct(x: np.ndarray) -> np.ndarray:
    """Orthonormal DCT-II over the first axis: (H, ...) -> (H, ...) float64."""
    x = np.asarray(x, dtype=np.float64)
    return np.tensordot(dct_matrix(x.shape[0]), x, axes=(1, 0))


def idct(y: np.ndarray) -> np.ndarray:
    """Orthonormal DCT-III (the inverse of `dct`) over the first axis, float64."""
    y = np.asarray(y, dtype=np.float64)
    return np.tensordot(dct_matrix(y.shape[0]).T, y, axes=(1, 0))


# ---- PaliGemma id mapping -----------------------------------------------------------------------


def fast_to_text_ids(fast: np.ndarray, text_vocab: int, skip: int = FAST_SKIP_TOKENS) -> np.ndarray:
    """FAST token ids -> the text ids PaliGemma reads and writes: text_vocab - 1 - skip - f."""
    return text_vocab - 1 - skip - np.asarray(fast, dtype=np.int64)


def text_to_fast_ids(ids: np.ndarray, text_vocab: int, skip: int = FAST_SKIP_TOKENS) -> np.ndarray:
    """The inverse of fast_to_text_ids (the map is its own inverse)."""
    return text_vocab - 1 - skip - np.asarray(ids, dtype=np.int64)


# ---- the tokenizer ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoded:
    """One decoded chunk: actions (H, D) float32 and what relaxed decoding did to get there."""

    actions: np.ndarray
    coefficients: int  # how many DCT coefficients the tokens held
    padded: int  # zeros appended to reach H * D
    truncated: int  # coefficients cut beyond H * D


class FastTokenizer:
    """processor_config.json numbers + the BPE as `tokenizers` data. Thread-safe for decode."""

    def __init__(
        self,
        bpe: Tokenizer,
        *,
        scale: float,
        min_token: int,
        vocab_size: int,
        time_horizon: int | None = None,
        action_dim: int | None = None,
        clean_up_spaces: bool = False,
    ) -> None:
        bpe.no_padding()
        bpe.no_truncation()
        self.bpe = bpe
        self.scale = float(scale)
        self.min_token = int(min_token)
        self.vocab_size = int(vocab_size)
        self.time_horizon = time_horizon
        self.action_dim = action_dim
        self.clean_up_spaces = clean_up_spaces

    @classmethod
    def load(cls, directory: Path) -> FastTokenizer:
        """From a FAST tokenizer directory; ModelLoadError naming a missing or malformed file."""
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise ModelLoadError(f"missing {CONFIG_FILE} in {directory}. {HELP}")
        config = read_json(config_path)
        numbers = {}
        for key in ("scale", "min_token", "vocab_size"):
            value = config.get(key)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ModelLoadError(f"{config_path}: '{key}' must be a number, got {value!r}")
            numbers[key] = value
        if numbers["scale"] <= 0 or int(numbers["vocab_size"]) <= 0:
            raise ModelLoadError(f"{config_path}: scale and vocab_size must be positive")
        bpe_path = directory / BPE_DIR / BPE_FILE
        if not bpe_path.is_file():
            raise ModelLoadError(f"missing {BPE_DIR}/{BPE_FILE} in {directory}. {HELP}")
        try:
            bpe = Tokenizer.from_file(str(bpe_path))
        except Exception as exc:  # tokenizers raises its own Exception type on malformed files
            raise ModelLoadError(f"{bpe_path} is not a tokenizers tokenizer.json: {exc}") from None
        if bpe.get_vocab_size(with_added_tokens=True) > int(numbers["vocab_size"]):
            raise ModelLoadError(
                f"{bpe_path} has {bpe.get_vocab_size(with_added_tokens=True)} tokens but "
                f"{config_path} says vocab_size {numbers['vocab_size']}"
            )
        bpe_config_path = directory / BPE_DIR / "tokenizer_config.json"
        bpe_config = read_json(bpe_config_path) if bpe_config_path.is_file() else {}

        def optional_int(key: str) -> int | None:
            value = config.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

        return cls(
            bpe,
            scale=float(numbers["scale"]),
            min_token=int(numbers["min_token"]),
            vocab_size=int(numbers["vocab_size"]),
            time_horizon=optional_int("time_horizon"),
            action_dim=optional_int("action_dim"),
            clean_up_spaces=bool(bpe_config.get("clean_up_tokenization_spaces", False)),
        )

    # ---- encode / decode ----------------------------------------------------------------------

    def coefficients(self, actions: np.ndarray) -> np.ndarray:
        """actions (H, D) -> quantised DCT coefficients (H * D,) int64, row-major."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2:
            raise ValueError(f"an action chunk is (horizon, dims), got shape {actions.shape}")
        return np.around(dct(actions) * self.scale).astype(np.int64).reshape(-1)

    def encode(self, actions: np.ndarray) -> list[int]:
        """actions (H, D) -> FAST token ids."""
        shifted = np.maximum(self.coefficients(actions) - self.min_token, 0)
        text = "".join(map(chr, shifted.tolist()))
        return list(self.bpe.encode(text, add_special_tokens=False).ids)

    def decode_coefficients(self, tokens: list[int] | np.ndarray) -> np.ndarray:
        """FAST token ids -> the quantised coefficients they spell (any length), int64."""
        ids = [int(t) for t in np.asarray(tokens, dtype=np.int64).reshape(-1)]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise FastDecodeError(
                f"{len(bad)} token(s) outside the FAST vocabulary [0, {self.vocab_size}): {bad[:8]}"
            )
        text = self.bpe.decode(ids, skip_special_tokens=False)
        if self.clean_up_spaces:
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        if "\ufffd" in text:
            raise FastDecodeError("the FAST tokens do not spell valid UTF-8 (a token cut mid-character)")
        return np.fromiter((ord(ch) for ch in text), dtype=np.int64, count=len(text)) + self.min_token

    def decode(
        self, tokens: list[int] | np.ndarray, horizon: int, action_dim: int, *, relaxed: bool = True
    ) -> Decoded:
        """FAST token ids -> actions (horizon, action_dim) float32 (inverse DCT of coefficients /
        scale). `relaxed` (LeRobot): zero-pad or truncate the coefficients to horizon * action_dim;
        otherwise a different count is a FastDecodeError."""
        coeffs = self.decode_coefficients(tokens)
        expected = horizon * action_dim
        padded = max(expected - coeffs.size, 0)
        truncated = max(coeffs.size - expected, 0)
        if (padded or truncated) and not relaxed:
            raise FastDecodeError(
                f"the FAST tokens hold {coeffs.size} DCT coefficients; a {horizon} x {action_dim} chunk "
                f"needs {expected}"
            )
        full = np.zeros(expected, dtype=np.int64)
        full[: min(expected, coeffs.size)] = coeffs[:expected]
        actions = idct(full.reshape(horizon, action_dim) / self.scale)
        return Decoded(actions.astype(np.float32), int(coeffs.size), padded, truncated)
