"""NVIDIA GR00T N1.5 backend: model.py (network), checkpoint.py (format), policy.py (VLAModel)."""
