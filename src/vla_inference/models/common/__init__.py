"""What the model families share: transformer primitives (`transformer`), the ViT tower (`vit`),
checkpoint files and streaming weight loading (`weights`), flow-matching sampling (`flow`),
tokenizer files (`tokenizers`) and random initialisation (`init`)."""
