"""Isaac-GR00T's ZeroMQ inference-service protocol: msgpack codec with both numpy encodings
(codec.py), observation and action formats (layouts.py) and the endpoint (endpoint.py)."""

from vla_inference.transport.groot_zmq.endpoint import GrootZmqEndpoint

__all__ = ["GrootZmqEndpoint"]
