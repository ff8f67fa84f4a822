"""Transport security: TLS / mutual-TLS server credentials and bearer-token authentication.

* `server_credentials(settings)` builds gRPC server credentials from VLA_TLS_CERT_FILE,
  VLA_TLS_KEY_FILE and (mutual TLS) VLA_TLS_CLIENT_CA_FILE; None means plaintext.
* `TokenAuthInterceptor` checks `authorization: Bearer <token>` on every RPC against the tokens
  of VLA_AUTH_TOKENS / VLA_AUTH_TOKEN_FILE, in constant time over all of them, and answers
  UNAUTHENTICATED otherwise -- before the request is deserialized or reaches the servicer. The
  standard health service and reflection stay open so orchestrators can probe.

See SECURITY.md for the threat model.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from vla_inference.config import Settings

log = logging.getLogger(__name__)

# Services any caller may use without a token: liveness/readiness probes and API discovery.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
DENIED_MESSAGE = "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')"
_LOG_EVERY_S = 60.0


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the VLA_TLS_* files, or None for plaintext."""
    if not settings.tls_enabled:
        return None
    certificate_chain = Path(settings.tls_cert_file).read_bytes()
    private_key = Path(settings.tls_key_file).read_bytes()
    client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(private_key, certificate_chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _digest(token: bytes) -> bytes:
    # Comparing fixed-length digests hides the tokens' lengths as well as their content.
    return hashlib.sha256(token).digest()


class TokenChecker:
    """Holds the digests of the accepted tokens; `check` is constant-time over all of them."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = [_digest(token.encode()) for token in tokens]
        if not self._digests:
            raise ValueError("TokenChecker needs at least one token")

    def check(self, presented: str | bytes | None) -> bool:
        if presented is None:
            candidate = _digest(b"\0missing")  # still compare, so timing does not tell
        else:
            raw = presented.encode("utf-8", "surrogateescape") if isinstance(presented, str) else presented
            candidate = _digest(raw)
        matched = False
        for digest in self._digests:  # no early exit: every token is compared
            matched |= hmac.compare_digest(candidate, digest)
        return matched

    def check_metadata(self, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        return self.check(bearer_token(metadata))


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | bytes | None:
    """The token of the first `authorization: Bearer <token>` entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value if isinstance(value, str | bytes) else str(value)
        scheme, _, token = (text.decode("latin-1") if isinstance(text, bytes) else text).partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return None


def _service(method: str) -> str:
    # "/package.Service/Method" -> "package.Service"
    return method.lstrip("/").partition("/")[0]


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC outside OPEN_SERVICES without a valid bearer token (UNAUTHENTICATED)."""

    def __init__(self, tokens: Iterable[str], on_denied: Callable[[], None] | None = None) -> None:
        self._checker = TokenChecker(tokens)
        self._on_denied = on_denied
        self._lock = threading.Lock()
        self._denied_since_log = 0
        self._last_log = 0.0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if _service(method) in OPEN_SERVICES:
            return await continuation(handler_call_details)
        if self._checker.check_metadata(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: UNIMPLEMENTED as usual (reflection lists them anyway)
            return handler
        self._denied(method)
        return _deny_handler(handler)

    def _denied(self, method: str) -> None:
        if self._on_denied is not None:
            self._on_denied()
        with self._lock:
            self._denied_since_log += 1
            now = time.monotonic()
            if now - self._last_log < _LOG_EVERY_S:
                return
            count, self._denied_since_log, self._last_log = self._denied_since_log, 0, now
        log.warning("refused %d unauthenticated call(s) (latest: %s)", count, method)


def _deny_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers UNAUTHENTICATED without reading the request."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED_MESSAGE)

    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, None, serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, None, serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, None, serializer)
    return grpc.unary_unary_rpc_method_handler(deny, None, serializer)


def interceptors(settings: Settings, on_denied: Callable[[], None] | None = None) -> list[Any]:
    """The server interceptors VLA_* settings call for (token auth when tokens are configured)."""
    tokens = settings.auth_token_list()
    if not tokens:
        return []
    return [TokenAuthInterceptor(tokens, on_denied)]


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    return host in {"localhost", "::1"} or host.startswith("127.")
