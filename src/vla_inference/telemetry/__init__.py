"""Telemetry: Prometheus metrics and GPU readings."""
