"""pi0 / pi0.5 backend: model.py (network), checkpoint.py (formats), policy.py (serving), demo.py."""
