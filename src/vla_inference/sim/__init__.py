"""A simulated robot for closed-loop evaluation: MetaWorld tasks, expert demonstrations and a
gRPC client that drives any server through the public API (needs the `sim` extra)."""
