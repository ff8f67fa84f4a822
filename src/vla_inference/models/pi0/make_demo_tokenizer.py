"""Train the small SentencePiece tokenizer bundled with the pi0 demo model.

    python -m vla_inference.models.pi0.make_demo_tokenizer

writes `assets/demo_tokenizer.model`. The demo model is random, so the tokenizer only has to be
small, deterministic and able to spell any instruction (byte fallback) plus the pi0.5 prompt
("Task: ..., State: 0 1 ... 255;\\nAction: "). The special ids mirror PaliGemma's layout:
pad = 0, eos = 1, bos = 2, unk = 3, and "\\n" is a single piece.
"""

from __future__ import annotations

import io
from pathlib import Path

ASSET = Path(__file__).resolve().parent / "assets" / "demo_tokenizer.model"
VOCAB_SIZE = 512

_TEXT = """\
pick up the red block and place it in the bowl
put the cup on the plate
open the top drawer and put the bowl inside
close the microwave door
move the green cube to the left of the yellow cube
stack the blue block on top of the red block
push the button on the wall
fold the towel in half
wipe the table with the sponge
turn on the stove and put the pot on it
put both the alphabet soup and the tomato sauce in the basket
pick up the black bowl between the plate and the ramekin and place it on the plate
put the wine bottle on top of the cabinet
take the carrot out of the pot and put it on the cutting board
sort the fruits into the box
grasp the handle and pull the door open
place the spoon next to the fork
hand the object to the person
warm up the robot and wait
"""
_PROMPTS = (
    "Task: pick up the cup, State: 128 127 130 64 200 255 0;",
    "Action: ",
    "Task: open the drawer, State: 12 45 78 99 101 150 250;",
    "Action: ",
)


def training_sentences() -> list[str]:
    lines = [line for line in _TEXT.splitlines() if line.strip()] + list(_PROMPTS)
    numbers = [" ".join(str((i * 37 + j * 11) % 256) for j in range(16)) for i in range(64)]
    return lines * 4 + numbers


def train() -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_sentences()),
        model_writer=model,
        vocab_size=VOCAB_SIZE,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        user_defined_symbols=["\n"],
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        num_threads=1,
        seed_sentencepiece_size=100000,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def main() -> None:
    ASSET.parent.mkdir(parents=True, exist_ok=True)
    ASSET.write_bytes(train())
    print(f"wrote {ASSET} ({ASSET.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
