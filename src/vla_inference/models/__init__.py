"""Models: the model-agnostic contract (`base`), the registry, and one package per family."""
