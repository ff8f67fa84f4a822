"""vla-inference: a gRPC server for Vision-Language-Action robot policies.

Where a request goes, by folder:
  transport/      gRPC server, handlers, proto <-> domain conversion, error mapping
  engine/         admission, dynamic batching, deadlines, stream sessions, the model worker
  preprocessing/  image decoding and resizing shared by every model
  models/         the model-agnostic base class, the registry and one package per model family
  telemetry/      Prometheus metrics and GPU readings
  config.py       every VLA_* setting
  client.py       the Python client (sync and asyncio)
  cli.py          the `vla-inference` command
"""

__version__ = "0.1.0"
