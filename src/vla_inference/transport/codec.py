"""Conversion between protobuf messages and the domain types of models/base.py.

`decode` is the gRPC transport's decode step (engine/request.py), run in the engine's
preprocessing pool: cheap structural checks of the message (sizes, counts, the instruction length,
camera names) with messages that name the proto field, then image decoding and the real-time
chunking request. What a model needs of an observation (joint counts, finite values, its cameras)
the model checks once, in prepare (models/base.py); an empty instruction the engine refuses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.config import Settings
from vla_inference.engine import Answer, Decoded
from vla_inference.engine.realtime import Applied, RtcRequest, default_method
from vla_inference.models.base import InvalidObservation, ModelDescription, Observation, canonical_camera
from vla_inference.preprocessing.images import JPEG, PNG, RAW_RGB, ImageError, decode_image

MAX_REQUEST_ID_CHARS = 128
BASE_CAMERA = "base"
_ENCODINGS: dict[int, str] = {
    pb.IMAGE_ENCODING_UNSPECIFIED: JPEG,
    pb.IMAGE_ENCODING_JPEG: JPEG,
    pb.IMAGE_ENCODING_PNG: PNG,
    pb.IMAGE_ENCODING_RAW_RGB: RAW_RGB,
}


@dataclass(frozen=True)
class _EncodedImage:
    field: str
    data: bytes
    encoding: str
    width: int
    height: int


class MalformedMessage:
    """Stands in for a request whose bytes are not a valid message of the expected type, so the
    servicer can answer INVALID_ARGUMENT (gRPC's own deserializer would answer UNKNOWN)."""

    request_id = ""
    timestamp = 0.0

    def __init__(self, type_name: str, reason: str) -> None:
        self.type_name = type_name
        self.reason = reason


def parse_observation(data: bytes) -> pb.Observation | MalformedMessage:
    """Request deserializer for Observation that never raises."""
    try:
        return pb.Observation.FromString(data)
    except Exception as exc:  # DecodeError, RecursionError, invalid UTF-8 ...
        return MalformedMessage("vla_inference.v1.Observation", type(exc).__name__)


def parse_ignored(data: bytes) -> None:
    """Request deserializer for RPCs whose request (google.protobuf.Empty) carries nothing."""
    return None


def require_observation(request: pb.Observation | MalformedMessage) -> pb.Observation:
    if isinstance(request, MalformedMessage):
        raise InvalidObservation(
            "request", f"the bytes are not a valid serialized {request.type_name} ({request.reason})"
        )
    return request


def decode(request: pb.Observation | MalformedMessage, settings: Settings, info: ModelDescription) -> Decoded:
    """The gRPC decode step: the checks, the images and the real-time chunking request."""
    observation = require_observation(request)
    check_envelope(observation, settings, info)
    return Decoded(observation_from_proto(observation, settings, info), rtc_request(observation, info))


def check_envelope(request: pb.Observation, settings: Settings, info: ModelDescription) -> None:
    """Checks that need no decoding, before the images are decoded."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidObservation("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters")
    if len(request.language_instruction) > settings.max_instruction_chars:
        raise InvalidObservation(
            "language_instruction",
            f"{len(request.language_instruction)} characters, "
            f"over the limit of {settings.max_instruction_chars}",
        )
    joints = len(request.joint_positions)
    if joints > settings.max_joints or len(request.joint_velocities) > settings.max_joints:
        raise InvalidObservation("joint_positions", f"at most {settings.max_joints} values")
    for field in ("joint_positions", "joint_velocities"):
        check_finite(field, getattr(request, field))
    cameras = len(request.cameras) + (1 if request.camera_image else 0)
    if cameras > settings.max_cameras:
        raise InvalidObservation(
            "cameras", f"{cameras} camera frames, over the limit of {settings.max_cameras}"
        )
    if cameras == 0:
        raise InvalidObservation(
            "camera_image", "no image: send camera_image or at least one entry in cameras"
        )
    check_history(request, settings, info)


MAX_HISTORY_STEPS = 32


def check_history(request: pb.Observation, settings: Settings, info: ModelDescription) -> None:
    """Observation.history: only for a model that reads one; offsets negative and distinct."""
    if not request.history:
        return
    if not (info.image_history or info.state_history):
        raise InvalidObservation("history", f"{info.family} reads no history; send the current step only")
    if len(request.history) > MAX_HISTORY_STEPS:
        raise InvalidObservation("history", f"at most {MAX_HISTORY_STEPS} earlier steps")
    seen: set[int] = set()
    for index, step in enumerate(request.history):
        field = f"history[{index}]"
        if step.offset >= 0 or step.offset in seen:
            raise InvalidObservation(f"{field}.offset", "must be negative (steps earlier) and distinct")
        seen.add(step.offset)
        if len(step.cameras) > settings.max_cameras or len(step.joint_positions) > settings.max_joints:
            raise InvalidObservation(
                field, f"at most {settings.max_cameras} cameras and {settings.max_joints} values"
            )
        check_finite(f"{field}.joint_positions", step.joint_positions)


def check_finite(field: str, values: Sequence[float]) -> None:
    """NaN or inf in a list of numbers: refused naming the first bad index."""
    # A plain loop: a robot's few joint values are checked faster than numpy can be set up.
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise InvalidObservation(
                field, f"value {index} is {value}: every value must be finite (no NaN or inf)"
            )


def _encoded_images(request: pb.Observation, info: ModelDescription) -> dict[str, _EncodedImage]:
    images: dict[str, _EncodedImage] = {}
    if request.camera_image:
        images[BASE_CAMERA] = _EncodedImage(
            "camera_image",
            request.camera_image,
            _encoding(request.camera_image_encoding, "camera_image_encoding"),
            request.camera_image_width,
            request.camera_image_height,
        )
    images.update(_named_images(request.cameras, "cameras", info, taken=set(images)))
    return images


def _named_images(
    cameras: Sequence[pb.CameraImage], where: str, info: ModelDescription, taken: set[str] | None = None
) -> dict[str, _EncodedImage]:
    """Repeated CameraImage (Observation.cameras, PastStep.cameras) by canonical name, checked."""
    images: dict[str, _EncodedImage] = {}
    taken = set(taken or ())
    for index, camera in enumerate(cameras):
        field = f"{where}[{index}]"
        name = canonical_camera(camera.name)
        if not name:
            raise InvalidObservation(f"{field}.name", "camera name is empty")
        if name in images or name in taken:
            raise InvalidObservation(f"{field}.name", f"camera {name!r} is given twice")
        if name not in info.camera_names:
            raise InvalidObservation(
                f"{field}.name",
                f"unknown camera {camera.name!r}; this model uses: {', '.join(info.camera_names)}",
            )
        images[name] = _EncodedImage(
            field, camera.data, _encoding(camera.encoding, f"{field}.encoding"), camera.width, camera.height
        )
    return images


def _encoding(value: int, field: str) -> str:
    try:
        return _ENCODINGS[pb.ImageEncoding.ValueType(value)]
    except KeyError:
        raise InvalidObservation(field, f"unknown image encoding {value}; use JPEG, PNG or RAW_RGB") from None


def observation_from_proto(
    request: pb.Observation, settings: Settings, info: ModelDescription
) -> Observation:
    """Decode images and copy fields (CPU work)."""
    images = _decode_all(_encoded_images(request, info), settings, info)
    past_images = {
        step.offset: _decode_all(_named_images(step.cameras, f"history[{i}].cameras", info), settings, info)
        for i, step in enumerate(request.history)
        if step.cameras
    }
    past_joints = {
        step.offset: np.asarray(step.joint_positions, dtype=np.float32)
        for step in request.history
        if step.joint_positions
    }
    return Observation(
        images=images,
        joint_positions=np.asarray(request.joint_positions, dtype=np.float32),
        joint_velocities=np.asarray(request.joint_velocities, dtype=np.float32),
        instruction=request.language_instruction,
        embodiment=request.embodiment_tag,
        seed=request.seed if request.HasField("seed") else None,  # None: the model draws one
        past_images=past_images,
        past_joint_positions=past_joints,
    )


def _decode_all(
    encoded: dict[str, _EncodedImage], settings: Settings, info: ModelDescription
) -> dict[str, np.ndarray]:
    images = {}
    at_least = info.decode_size if settings.jpeg_scaled_decode else None
    for name, item in encoded.items():
        try:
            images[name] = decode_image(
                item.data,
                item.encoding,
                width=item.width,
                height=item.height,
                max_pixels=settings.max_image_pixels,
                at_least=at_least,
            )
        except ImageError as exc:
            raise InvalidObservation(item.field, str(exc)) from None
    return images


_RTC_METHODS: dict[int, str] = {
    pb.RTC_METHOD_UNSPECIFIED: "",
    pb.RTC_METHOD_NONE: "none",
    pb.RTC_METHOD_GUIDED: "guided",
    pb.RTC_METHOD_HARD: "hard",
}
MAX_PREVIOUS_ACTIONS = 4096


def rtc_request(request: pb.Observation, info: ModelDescription) -> RtcRequest | None:
    """Observation.rtc checked and decoded (None when unset)."""
    if not request.HasField("rtc"):
        return None
    r = request.rtc
    try:
        method = _RTC_METHODS[int(r.method)]
    except KeyError:
        raise InvalidObservation(
            "rtc.method", f"unknown method {r.method}; use NONE, GUIDED or HARD"
        ) from None
    for name, value, limit in (
        ("control_rate_hz", r.control_rate_hz, 10_000.0),
        ("max_guidance", r.max_guidance, 1000.0),
    ):
        if not (np.isfinite(value) and 0 <= value <= limit):
            raise InvalidObservation(f"rtc.{name}", f"must be between 0 and {limit:g}, got {value}")
    if len(r.previous_request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidObservation("rtc.previous_request_id", f"at most {MAX_REQUEST_ID_CHARS} characters")
    previous = None
    if r.previous_actions:
        if len(r.previous_actions) > MAX_PREVIOUS_ACTIONS:
            raise InvalidObservation("rtc.previous_actions", f"at most {MAX_PREVIOUS_ACTIONS} actions")
        for index, action in enumerate(r.previous_actions):
            if len(action.joint_commands) != info.action_dim:
                raise InvalidObservation(
                    f"rtc.previous_actions[{index}]",
                    f"expected {info.action_dim} values (ModelInfo.action_dim), "
                    f"got {len(action.joint_commands)}",
                )
        previous = np.array([a.joint_commands for a in r.previous_actions], np.float32)
        if not np.all(np.isfinite(previous)):
            raise InvalidObservation("rtc.previous_actions", "values must be finite (found NaN or inf)")
    return RtcRequest(
        method=method,
        executed=int(r.executed_actions),
        delay=int(r.delay_actions) if r.HasField("delay_actions") else None,
        control_hz=float(r.control_rate_hz),
        previous_request_id=r.previous_request_id,
        previous_actions=previous,
        max_guidance=float(r.max_guidance),
    )


def rtc_applied(applied: Applied) -> pb.RtcApplied:
    return pb.RtcApplied(
        method=f"RTC_METHOD_{applied.method.upper()}",
        delay_actions=applied.delay,
        overlap_actions=applied.overlap,
        delay_estimated=applied.delay_estimated,
    )


def action_chunk(
    request: pb.Observation | MalformedMessage, answer: Answer, model_name: str
) -> pb.ActionChunk:
    """Build the answer for one request (only a well-formed one has an answer; the type admits
    MalformedMessage, which echoes the same fields, for the transport's convenience)."""
    t = answer.timing
    total_ms = t.total_s * 1000
    chunk = pb.ActionChunk(
        rtc=rtc_applied(answer.rtc) if answer.rtc is not None else None,
        inference_time_ms=total_ms,
        confidence=float(answer.prediction.confidence),
        request_id=request.request_id,
        observation_timestamp=request.timestamp,
        model_name=model_name,
        timing=pb.TimingBreakdown(
            decode_ms=t.decode_s * 1000,
            preprocess_ms=t.preprocess_s * 1000,
            queue_ms=t.queue_s * 1000,
            model_ms=t.model_s * 1000,
            postprocess_ms=t.postprocess_s * 1000,
            total_ms=total_ms,
            batch_size=t.batch_size,
        ),
        skipped_request_ids=list(answer.skipped),
    )
    actions = chunk.actions
    for row in np.asarray(answer.prediction.actions, dtype=np.float32).tolist():
        actions.add().joint_commands.extend(row)
    return chunk


def model_info_message(
    info: ModelDescription, settings: Settings, protocol_ports: Mapping[str, int] | None = None
) -> pb.ModelInfo:
    return pb.ModelInfo(
        model_name=info.name,
        model_version=info.version,
        action_dim=info.action_dim,
        chunk_size=info.chunk_size,
        supported_embodiments=list(info.embodiments),
        device=info.device,
        model_family=info.family,
        demo=info.demo,
        camera_names=list(info.camera_names),
        image_width=info.image_size[0],
        image_height=info.image_size[1],
        state_dims=dict(info.state_dims),
        default_embodiment=info.default_embodiment,
        confidence_definition=info.confidence_definition,
        model_horizon=info.horizon,
        max_batch_size=settings.batch_size,
        dtype=info.dtype,
        description=info.description,
        state_layouts={k: pb.Layout(names=list(v)) for k, v in info.state_layouts.items()},
        action_layouts={k: pb.Layout(names=list(v)) for k, v in info.action_layouts.items()},
        rtc_methods=list(info.rtc_methods),
        rtc_default_method=default_method(info.rtc_methods, settings),
        image_history={k: pb.Offsets(offsets=list(v)) for k, v in info.image_history.items() if v},
        state_history={k: pb.Offsets(offsets=list(v)) for k, v in info.state_history.items() if v},
        protocol_ports=dict(protocol_ports or {}),
    )
