"""SmolVLA (LeRobot): the network (`model`) and LeRobot's checkpoint files (`checkpoint`)."""
