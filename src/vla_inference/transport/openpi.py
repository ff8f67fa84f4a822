"""openpi's websocket policy-server protocol, in front of the same engine as gRPC (VLA_OPENPI_PORT).

Scripts written against openpi's `openpi-client` (`WebsocketClientPolicy(host, port, api_key)`:
LIBERO, DROID and ALOHA examples) work against this server unchanged, and batch with gRPC robots.

The protocol (openpi's serving/websocket_policy_server.py and openpi_client/msgpack_numpy.py):

  * a websocket on VLA_HOST:VLA_OPENPI_PORT (wss with the gRPC port's certificates when VLA_TLS_*
    are set); `GET /healthz` answers 200 "OK\\n" while the server is SERVING (503 otherwise);
  * when tokens are configured (VLA_AUTH_TOKENS / VLA_AUTH_TOKEN_FILE) the handshake needs
    `Authorization: Api-Key <token>` (what openpi-client sends; `Bearer` works too), else HTTP 401;
  * the server's first message is the metadata dict; then each binary message from the client is
    one observation dict and gets one binary answer, in order:
        {"actions": (H, D) float32 array in the robot's units,
         "server_timing": {"infer_ms", "prev_total_ms" (from the 2nd answer)},
         "policy_timing": {"infer_ms", "queue_ms", "preprocess_ms", "batch_size"}};
    openpi's control messages ({"__ctrl__": ...}) are acknowledged with {"__ack__": ...};
  * messages are msgpack; numpy arrays travel as maps with the bin keys __ndarray__, data, dtype,
    shape (np.generic as __npgeneric__, data, dtype). Decoding is strict: no ext types, no object
    or structured dtypes, sizes checked against the bytes; nothing is ever unpickled;
  * a bad observation (or a full / draining server) gets one text message with the status and a
    one-line reason, never a traceback, then a close with code 1011; other clients go on.

Observation layouts (`detect_layout`, or VLA_OPENPI_LAYOUT): openpi's DROID, LIBERO and ALOHA
dictionaries, mapped to the server's cameras and joint state (see LAYOUTS). Images may be HWC or
CHW, uint8 or float in [0, 1], as openpi accepts them. The embodiment is VLA_OPENPI_EMBODIMENT
(openpi observations name none). An optional integer "seed" key (our extension) fixes the sampling
noise like Observation.seed.
"""

from __future__ import annotations

import asyncio
import http
import itertools
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from vla_inference.config import Settings
from vla_inference.engine import Completed, InferenceEngine
from vla_inference.models.base import InvalidObservation, ModelDescription, Observation, PreparedSample
from vla_inference.transport import security
from vla_inference.transport.outcome import Outcome, Unavailable, classify, record

log = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
MAX_ARRAY_DIMS = 8
MAX_NESTING = 16
# How long a closing connection (or a refused handshake: 401, /healthz) waits for the peer to close;
# bounds how long stop() can take with clients that linger.
CLOSE_TIMEOUT_S = 2.0
# A close reason travels in a control frame of at most 125 bytes.
_MAX_REASON = 120
_DTYPE = re.compile(r"[<>|=]?[biuf][1-9][0-9]?")


# --------------------------------------------------------------------------------------------
# msgpack with openpi's numpy extension
# --------------------------------------------------------------------------------------------


class DecodeError(ValueError):
    """The bytes are not an openpi msgpack message this server accepts."""


def _numpy_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic) and obj.dtype.kind not in "biuf":
        raise TypeError(f"cannot send dtype {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot pack {type(obj).__name__}")


def pack(obj: Any) -> bytes:
    """msgpack with numpy arrays and scalars as openpi-client encodes them."""
    return msgpack.packb(obj, default=_numpy_default, use_bin_type=True)


def _dtype(value: Any) -> np.dtype[Any]:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    if not isinstance(text, str) or not _DTYPE.fullmatch(text):
        raise DecodeError(f"array dtype {text!r} is not a bool, integer or float type")
    try:
        return np.dtype(text)
    except TypeError:
        raise DecodeError(f"array dtype {text!r} is not a numpy dtype") from None


def _numpy_hook(obj: dict[Any, Any]) -> Any:
    if b"__ndarray__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        shape = obj.get(b"shape")
        data = obj.get(b"data")
        if not isinstance(data, bytes):
            raise DecodeError("array data must be bytes")
        if (
            not isinstance(shape, list | tuple)
            or len(shape) > MAX_ARRAY_DIMS
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            raise DecodeError(f"array shape {shape!r} is not a list of at most {MAX_ARRAY_DIMS} sizes")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dtype.itemsize != len(data):
            raise DecodeError(
                f"array of shape {tuple(shape)} and dtype {dtype.str} needs {count * dtype.itemsize} "
                f"bytes, got {len(data)}"
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        value = obj.get(b"data")
        if not isinstance(value, bool | int | float):
            raise DecodeError("numpy scalar data must be a number")
        try:
            return dtype.type(value)
        except (OverflowError, ValueError):
            raise DecodeError(f"numpy scalar {value!r} does not fit {dtype.str}") from None
    return obj


def _refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack extension type {code} is not accepted")


def _depth(obj: Any, level: int = 0) -> int:
    if level > MAX_NESTING:
        raise DecodeError(f"the message nests deeper than {MAX_NESTING} levels")
    if isinstance(obj, dict):
        return max((_depth(v, level + 1) for v in obj.values()), default=level)
    if isinstance(obj, list):
        return max((_depth(v, level + 1) for v in obj), default=level)
    return level


def unpack(data: bytes) -> Any:
    """Decode one message; raises DecodeError with a short reason for anything else."""
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, object_hook=_numpy_hook, ext_hook=_refuse_ext
        )
    except DecodeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise DecodeError(f"not a msgpack message ({reason})") from None
    _depth(obj)
    return obj


# --------------------------------------------------------------------------------------------
# Observation layouts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where one of openpi's example environments puts its cameras, state and prompt."""

    name: str
    cameras: tuple[tuple[str, str], ...]  # (key, our camera name); "a/b" inside a nested dict
    state: tuple[str, ...]  # keys whose values are concatenated into joint_positions, in order
    markers: tuple[str, ...]  # keys that identify the layout

    def describe(self) -> str:
        keys = [key for key, _ in self.cameras] + list(self.state) + ["prompt"]
        return f"{self.name.upper()} ({', '.join(keys)})"


LAYOUTS: dict[str, Layout] = {
    # openpi examples/droid: 7 joint positions + 1 gripper position; actions 7 joint velocities + gripper.
    "droid": Layout(
        "droid",
        cameras=(
            ("observation/exterior_image_1_left", "base"),
            ("observation/wrist_image_left", "left_wrist"),
        ),
        state=("observation/joint_position", "observation/gripper_position"),
        markers=("observation/joint_position", "observation/exterior_image_1_left"),
    ),
    # openpi examples/libero: 8-dim state (eef pose + gripper); 7-dim actions.
    "libero": Layout(
        "libero",
        cameras=(("observation/image", "base"), ("observation/wrist_image", "left_wrist")),
        state=("observation/state",),
        markers=("observation/state", "observation/image"),
    ),
    # openpi examples/aloha_real / aloha_sim: 14-dim state; cam_low is not used by pi0 (as in openpi).
    "aloha": Layout(
        "aloha",
        cameras=(
            ("images/cam_high", "base"),
            ("images/cam_left_wrist", "left_wrist"),
            ("images/cam_right_wrist", "right_wrist"),
        ),
        state=("state",),
        markers=("images",),
    ),
}


def detect_layout(obs: Mapping[str, Any], setting: str = "auto") -> Layout:
    """The layout VLA_OPENPI_LAYOUT names, or the first whose marker keys the observation has."""
    if setting != "auto":
        return LAYOUTS[setting]
    for layout in LAYOUTS.values():
        if any(marker in obs for marker in layout.markers):
            return layout
    shown = ", ".join(sorted(map(repr, obs))[:12]) or "none"
    raise InvalidObservation(
        "observation",
        f"unrecognised keys ({shown}); expected openpi's "
        + " or ".join(layout.describe() for layout in LAYOUTS.values()),
    )


def _lookup(obs: Mapping[str, Any], key: str) -> Any:
    if key in obs:
        return obs[key]
    head, _, rest = key.partition("/")
    inner = obs.get(head)
    if rest and isinstance(inner, Mapping):
        return inner.get(rest)
    return None


def image_from_openpi(value: Any, key: str, max_pixels: int) -> np.ndarray:
    """An openpi image (HWC or CHW; uint8, or float in [0, 1]) -> (H, W, 3) uint8."""
    if not isinstance(value, np.ndarray) or value.ndim != 3:
        raise InvalidObservation(key, "expected an image array of shape (H, W, 3) or (3, H, W)")
    image = value
    if image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)  # CHW -> HWC, as openpi's _parse_image does
    if image.shape[-1] != 3:
        raise InvalidObservation(key, f"expected 3 colour channels, got shape {value.shape}")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise InvalidObservation(key, f"image has no pixels (shape {value.shape})")
    if height * width > max_pixels:
        raise InvalidObservation(
            key, f"image is {width}x{height} pixels, over the limit of {max_pixels} (VLA_MAX_IMAGE_PIXELS)"
        )
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype.kind == "f":
        if not np.all(np.isfinite(image)):
            raise InvalidObservation(key, "float image has NaN or inf values")
        return np.ascontiguousarray((np.clip(image, 0.0, 1.0) * 255).astype(np.uint8))
    raise InvalidObservation(key, f"expected uint8 (or float in [0, 1]) pixels, got {image.dtype}")


def _state_part(value: Any, key: str) -> np.ndarray:
    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
    elif isinstance(value, list | tuple | int | float) and not isinstance(value, bool):
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidObservation(key, "expected numbers") from None
    else:
        raise InvalidObservation(key, f"expected an array of numbers, got {type(value).__name__}")
    if array.dtype.kind not in "biuf" or array.ndim > 1:
        raise InvalidObservation(key, f"expected a 1-D array of numbers, got shape {array.shape}")
    array = array.astype(np.float32).reshape(-1)
    if not np.all(np.isfinite(array)):
        raise InvalidObservation(key, "values must be finite (found NaN or inf)")
    return array


def observation_from_openpi(
    obs: Any, settings: Settings, info: ModelDescription, layout_setting: str = "auto"
) -> Observation:
    """Map an openpi observation dict to the server's Observation (cameras the model does not use,
    like ALOHA's cam_low, are dropped as openpi's own policies drop them)."""
    if not isinstance(obs, Mapping):
        raise InvalidObservation("observation", f"expected a dict, got {type(obs).__name__}")
    layout = detect_layout(obs, layout_setting)
    images: dict[str, np.ndarray] = {}
    for key, camera in layout.cameras:
        value = _lookup(obs, key)
        if value is None or camera not in info.camera_names:
            continue
        images[camera] = image_from_openpi(value, key, settings.max_image_pixels)
    if not images:
        keys = ", ".join(key for key, camera in layout.cameras if camera in info.camera_names)
        raise InvalidObservation("observation", f"no camera image: send at least one of {keys}")
    parts = []
    for key in layout.state:
        value = _lookup(obs, key)
        if value is None:
            raise InvalidObservation(key, f"missing (the {layout.name.upper()} layout needs it)")
        parts.append(_state_part(value, key))
    joints = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if joints.size > settings.max_joints:
        raise InvalidObservation(layout.state[0], f"at most {settings.max_joints} values")
    embodiment = settings.openpi_embodiment or info.default_embodiment
    expected = info.state_dims.get(embodiment)
    if expected is not None and joints.size != expected:
        raise InvalidObservation(
            " + ".join(layout.state),
            f"{joints.size} state values ({layout.name.upper()} layout); embodiment {embodiment!r} of "
            f"this model takes {expected}",
        )
    prompt = obs.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidObservation("prompt", "missing or not a string (openpi observations carry the task)")
    if len(prompt) > settings.max_instruction_chars:
        raise InvalidObservation(
            "prompt", f"{len(prompt)} characters, over the limit of {settings.max_instruction_chars}"
        )
    seed = obs.get("seed")  # our extension (Observation.seed); openpi clients send none
    if seed is not None:
        if isinstance(seed, np.integer):
            seed = int(seed)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise InvalidObservation("seed", "expected a whole number in [0, 2**64)")
    return Observation(
        images=images,
        joint_positions=joints,
        instruction=prompt,
        embodiment=settings.openpi_embodiment,
        seed=seed,
    )


# --------------------------------------------------------------------------------------------
# The endpoint
# --------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    sample: PreparedSample | None  # None for a control message
    control: str
    preprocess_s: float


class OpenpiEndpoint:
    """The websocket server. `start()` binds VLA_HOST:VLA_OPENPI_PORT once the engine serves."""

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
        self._server: Server | None = None
        self._ids = itertools.count(1)
        self.port = 0
        self.connections = 0

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> int:
        s = self.settings
        assert s.openpi_port is not None
        tls = _ssl_context(s)
        try:
            self._server = await serve(
                self._handle,
                s.host,
                s.openpi_port,
                compression=None,
                max_size=s.max_message_bytes,
                max_queue=4,
                close_timeout=CLOSE_TIMEOUT_S,
                process_request=self._process_request,
                ssl=tls,
                logger=logging.getLogger("vla_inference.transport.openpi.websockets"),
            )
        except OSError as exc:
            raise RuntimeError(
                f"cannot bind the openpi endpoint to {s.host}:{s.openpi_port} (VLA_OPENPI_PORT): {exc}"
            ) from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        scheme = "wss" if tls else "ws"
        auth = "Api-Key token required" if self._tokens else "no token check"
        log.info(
            "openpi websocket endpoint on %s://%s:%d (layout %s, %s)",
            scheme,
            s.host,
            self.port,
            s.openpi_layout,
            auth,
        )
        missing = [name for name, on in (("TLS", tls is not None), ("tokens", self._tokens)) if not on]
        if not security.is_loopback(s.host) and missing:
            log.warning(
                "openpi endpoint bound to %s (not loopback) without %s; see SECURITY.md",
                s.host,
                " and ".join(missing),
            )
        return self.port

    async def stop(self) -> None:
        """Close every connection (1001 going away) and the listening socket."""
        if self._server is not None:
            self._server.close(close_connections=True, reason="server shutting down")
            await self._server.wait_closed()
            self._server = None

    # --- handshake: health and authentication -----------------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.partition("?")[0] == HEALTH_PATH:
            if self._serving():
                return connection.respond(http.HTTPStatus.OK, "OK\n")
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "not serving\n")
        if self._tokens is not None and not self._tokens.check(api_key(request.headers)):
            if self._on_denied is not None:
                self._on_denied()
            return connection.respond(
                http.HTTPStatus.UNAUTHORIZED,
                "missing or invalid API key (send the header 'Authorization: Api-Key <token>')\n",
            )
        return None

    # --- one connection ---------------------------------------------------------------------------
    async def _handle(self, connection: ServerConnection) -> None:
        self.connections += 1
        connection_id = next(self._ids)
        log.debug("openpi connection %d from %s opened", connection_id, connection.remote_address)
        try:
            engine = self._engine_ref()
            if engine is None:
                return
            await connection.send(pack(self._metadata(engine.model_info)))
            previous_total_ms: float | None = None
            for number in itertools.count(1):
                try:
                    message = await connection.recv()
                except ConnectionClosed as closed:
                    if closed.sent is not None and closed.sent.code == CloseCode.MESSAGE_TOO_BIG:
                        # websockets refused a message over VLA_MAX_MESSAGE_SIZE_MB (close 1009).
                        record(engine, "RESOURCE_EXHAUSTED")
                    return
                arrival = time.monotonic()
                try:
                    answer = await self._answer(message, f"openpi-{connection_id}-{number}", arrival)
                except _Refused as refused:
                    await _fail(connection, refused.outcome)
                    return
                if "server_timing" in answer and previous_total_ms is not None:
                    answer["server_timing"]["prev_total_ms"] = previous_total_ms
                await connection.send(pack(answer))
                if "server_timing" in answer:
                    previous_total_ms = (time.monotonic() - arrival) * 1000
        except ConnectionClosed:
            return
        finally:
            self.connections -= 1
            log.debug("openpi connection %d closed", connection_id)

    def _metadata(self, info: ModelDescription) -> dict[str, Any]:
        embodiment = self.settings.openpi_embodiment or info.default_embodiment
        return {
            "server": "vla-inference",
            "model_name": info.name,
            "model_family": info.family,
            "action_dim": info.action_dim,
            "action_horizon": info.chunk_size,
            "embodiment": embodiment,
            "state_dim": info.state_dims.get(embodiment, 0),
            "layout": self.settings.openpi_layout,
        }

    async def _answer(self, message: str | bytes, request_id: str, arrival: float) -> dict[str, Any]:
        """One observation through the engine; _Refused carries the outcome of a failure."""
        engine = self._engine_ref()
        embodiment = ""
        try:
            if engine is None or not self._serving():
                raise Unavailable("the server is not serving; retry when /healthz answers OK")
            if isinstance(message, str):
                raise InvalidObservation("message", "send msgpack bytes (binary frames), not text")
            with engine.admit():
                prepared = await engine.preprocess(self._prepare, engine, message)
                if prepared.sample is None:
                    return {"__ack__": prepared.control}
                embodiment = prepared.sample.embodiment
                deadline = arrival + self.settings.timeout_ms / 1000
                done = await engine.infer(prepared.sample, deadline, request_id)
        except asyncio.CancelledError:
            record(engine, "CANCELLED")
            raise
        except Exception as exc:
            outcome = classify(exc, "openpi endpoint")
            record(engine, outcome.status)
            raise _Refused(outcome) from None
        total_s = time.monotonic() - arrival
        record(engine, "OK", embodiment, total_s)
        return _result(done, prepared.preprocess_s, total_s)

    def _prepare(self, engine: InferenceEngine, message: bytes) -> _Prepared:
        """Decode, map the layout and run the model's preprocessing; in the worker pool."""
        t0 = time.monotonic()
        try:
            obs = unpack(message)
        except DecodeError as exc:
            raise InvalidObservation("message", str(exc)) from None
        if isinstance(obs, Mapping) and "__ctrl__" in obs:
            control = obs["__ctrl__"]
            known = control in ("episode_start", "episode_end")
            return _Prepared(None, control if known else "ignored", 0.0)
        info = engine.model_info
        observation = observation_from_openpi(obs, self.settings, info, self.settings.openpi_layout)
        sample = engine.prepare(observation)
        return _Prepared(sample, "", time.monotonic() - t0)


class _Refused(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.message)
        self.outcome = outcome


def _result(done: Completed, preprocess_s: float, total_s: float) -> dict[str, Any]:
    return {
        "actions": np.ascontiguousarray(done.prediction.actions, dtype=np.float32),
        "server_timing": {"infer_ms": total_s * 1000},
        "policy_timing": {
            "infer_ms": done.model_s * 1000,
            "queue_ms": done.queue_s * 1000,
            "preprocess_ms": preprocess_s * 1000,
            "batch_size": done.batch_size,
        },
    }


async def _fail(connection: ServerConnection, outcome: Outcome) -> None:
    """openpi's error path: one text message (here one line, no traceback), then close 1011."""
    line = f"{outcome.status}: {outcome.message}".replace("\n", " ")
    try:
        await connection.send(line)
        await connection.close(CloseCode.INTERNAL_ERROR, outcome.status[:_MAX_REASON])
    except ConnectionClosed:
        pass


def api_key(headers: Headers) -> str | None:
    """The token of `Authorization: Api-Key <token>` (openpi-client) or `Bearer <token>`."""
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() in ("api-key", "bearer") and token.strip():
        return token.strip()
    return None


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """wss with the gRPC port's certificate (and client CA: mutual TLS) when TLS is configured."""
    if not settings.tls_enabled:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_client_ca_file:
        context.load_verify_locations(cafile=str(Path(settings.tls_client_ca_file)))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
