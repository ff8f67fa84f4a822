"""What the server's extra front doors (the openpi websocket, the GR00T ZeroMQ endpoint) share:
the settings, the engine once it serves, whether the server is SERVING, the token check of
VLA_AUTH_TOKENS / VLA_AUTH_TOKEN_FILE (constant time, transport/security.py), and the hook that
counts a refused credential (UNAUTHENTICATED under the door's protocol)."""

from __future__ import annotations

from collections.abc import Callable

from vla_inference.config import Settings
from vla_inference.engine import InferenceEngine
from vla_inference.transport import security


class FrontDoor:
    def __init__(
        self,
        settings: Settings,
        engine_ref: Callable[[], InferenceEngine | None],
        serving: Callable[[], bool],
        on_denied: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._engine_ref = engine_ref
        self._serving = serving
        self._on_denied = on_denied
        tokens = settings.auth_token_list()
        self._tokens = security.TokenChecker(tokens) if tokens else None
        self.port = 0

    def _denied(self) -> None:
        """Count a request or handshake refused for its credential."""
        if self._on_denied is not None:
            self._on_denied()
