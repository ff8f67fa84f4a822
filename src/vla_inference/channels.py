"""How a client reaches one server or a fleet of replicas: the gRPC target string, the service
config and the channel options. The client (vla_inference.client) opens its channels from here.

A fleet is reached with gRPC's own client-side load balancing, no proxy in between:

* Targets: one `host:port` (a DNS name may resolve to several replicas, e.g. a Kubernetes headless
  Service; gRPC re-resolves it when a connection drops), a URI such as `dns:///name:port` or
  `ipv4:10.0.0.1:50051,10.0.0.2:50051`, or several `host:port` (a list, or one comma-separated
  string). Several names are resolved once, here, into one `ipv4:` / `ipv6:` address list
  (gRPC takes one target per channel); a fleet that changes should be one DNS name.
* `round_robin` over every address, each call to the next healthy replica, with client-side health
  checking: each connection watches the standard health service (`grpc.health.v1`, service
  `vla_inference.v1.VLAInference`), so a replica that turns NOT_SERVING (loading, stuck model,
  draining) gets no new calls.
* Retries (gRFC A6): a call that fails UNAVAILABLE before the server sent its response headers is
  retried on another replica, at most `max_attempts` in all, with backoff, and throttled per
  channel (retries stop while many calls fail). The server sends headers as soon as it admits a
  call, before any model work (transport/servicer.py), so a call that may have executed -- one
  whose replica died mid-call -- is never retried; its failure reaches the caller.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass

SERVICE = "vla_inference.v1.VLAInference"
# Schemes gRPC resolves itself; a target that starts with one is passed through untouched.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC retries of refused calls (UNAVAILABLE before the server admitted them)."""

    max_attempts: int = 3  # first try included
    initial_backoff_s: float = 0.02
    max_backoff_s: float = 0.2
    backoff_multiplier: float = 2.0
    # Throttling, per channel: every failed attempt costs a token, every success gives back
    # `token_ratio`; retries pause while fewer than half of `max_tokens` are left. With a ratio
    # of 1, retries go on while calls mostly succeed and stop after a few net failures (fleet
    # down): then each call fails after one attempt instead of max_attempts.
    max_tokens: int = 10
    token_ratio: float = 1.0

    def method_config(self) -> dict[str, object]:
        return {
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff_s}s",
                "maxBackoff": f"{self.max_backoff_s}s",
                "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class Target:
    """What to give grpc: the target string, and the host name TLS should verify ('' = grpc's own)."""

    uri: str
    server_name: str = ""


def resolve_target(target: str | Sequence[str]) -> Target:
    """One gRPC target for one server, a DNS name, a URI, or several `host:port` addresses."""
    parts = _split(target)
    if not parts:
        raise ValueError("no target given")
    if len(parts) == 1:
        return Target(parts[0])
    hosts = [_host_port(part) for part in parts]
    # TLS checks every replica's certificate against one name: the first host named, unless a
    # host name comes later (replicas' certificates carry the fleet's name, seldom each IP).
    names = [host for host, _ in hosts if not _is_ip(host)] or [hosts[0][0]]
    by_family: dict[socket.AddressFamily, list[str]] = {socket.AF_INET: [], socket.AF_INET6: []}
    for family, addresses in by_family.items():
        for host, port in hosts:
            found = _addresses(host, port, family)
            if not found:
                break
            addresses.extend(found)
        else:
            scheme = "ipv4" if family == socket.AF_INET else "ipv6"
            return Target(f"{scheme}:{','.join(addresses)}", server_name=names[0])
    raise ValueError(
        f"targets {', '.join(parts)} do not all resolve to IPv4 (or all to IPv6) addresses; "
        "give IP addresses of one family or one DNS name for the fleet"
    )


def service_config(balanced: bool, retry: RetryPolicy) -> str:
    """The channel's service config (JSON): round_robin + health checking when balanced, and retries."""
    config: dict[str, object] = {}
    if balanced:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        config["healthCheckConfig"] = {"serviceName": SERVICE}
    if retry.max_attempts > 1:
        config["methodConfig"] = [retry.method_config()]
        config["retryThrottling"] = {"maxTokens": retry.max_tokens, "tokenRatio": retry.token_ratio}
    return json.dumps(config)


def channel_options(
    max_message_mb: int, *, balanced: bool, retry: RetryPolicy, server_name: str = ""
) -> list[tuple[str, int | str]]:
    size = max_message_mb * 1024 * 1024
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.enable_retries", 1 if retry.max_attempts > 1 else 0),
        ("grpc.service_config", service_config(balanced, retry)),
        # Ours, not one a DNS TXT record might carry.
        ("grpc.service_config_disable_resolution", 1),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
        options.append(("grpc.default_authority", server_name))
    return options


def _split(target: str | Sequence[str]) -> list[str]:
    if isinstance(target, str):
        target = target.strip()
        if target.startswith(_SCHEMES):
            return [target]
        return [part.strip() for part in target.split(",") if part.strip()]
    return [part.strip() for part in target if part.strip()]


def _host_port(address: str) -> tuple[str, int]:
    if address.startswith(_SCHEMES):
        raise ValueError(f"{address!r}: give several plain host:port addresses, or one URI")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _addresses(host: str, port: int, family: socket.AddressFamily) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except OSError:
        return []
    seen: list[str] = []
    for info in infos:
        ip = str(info[4][0])
        address = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        if address not in seen:
            seen.append(address)
    return seen
