"""openpi's websocket policy-server protocol: msgpack codec (codec.py), observation layouts
(layouts.py) and the endpoint (endpoint.py)."""

from vla_inference.transport.openpi.endpoint import OpenpiEndpoint

__all__ = ["OpenpiEndpoint"]
