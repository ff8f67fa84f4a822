"""pi0-FAST: PaliGemma decoding FAST action tokens (notes: fast_tokenizer.py, model.py, checkpoint.py)."""
