"""Where a family's tokenizer file is: VLA_TOKENIZER_PATH (the file, or a directory holding it)
wins, then the checkpoint directory. One lookup and one error for every family."""

from __future__ import annotations

from pathlib import Path

from vla_inference.models.base import ModelLoadError


def find_tokenizer(checkpoint_dir: Path | None, setting: str, file_name: str, help_text: str) -> Path:
    """The tokenizer file, or ModelLoadError naming where it looked and `help_text` (what the file
    is and where to get it)."""
    candidates: list[Path] = []
    if setting:
        given = Path(setting).expanduser()
        candidates.append(given / file_name if given.is_dir() else given)
    elif checkpoint_dir is not None:
        candidates.append(checkpoint_dir / file_name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates) or "nowhere"
    raise ModelLoadError(
        f"missing tokenizer {file_name} (looked at {looked}; set VLA_TOKENIZER_PATH or put it in the "
        f"checkpoint directory). {help_text}"
    )


def load_sentencepiece(path: Path, vocab_size: int) -> object:
    """A SentencePiece model whose pieces fit an embedding of `vocab_size` rows."""
    import sentencepiece

    try:
        tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(f"{path} is not a SentencePiece model: {exc}") from None
    if tokenizer.get_piece_size() > vocab_size:
        raise ModelLoadError(
            f"tokenizer {path} has {tokenizer.get_piece_size()} pieces but the model's embedding has "
            f"{vocab_size} rows: wrong tokenizer for this checkpoint"
        )
    return tokenizer
