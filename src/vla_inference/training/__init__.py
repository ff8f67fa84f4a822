"""Training the embedded default policy from simulated demonstrations (flow matching)."""
