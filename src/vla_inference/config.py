"""Configuration: every `VLA_*` environment variable, its default and what is allowed.

The single source of truth for settings. `Settings.from_env()` validates everything at
start-up and raises `ConfigError` with one line naming the variable, the value and what is
allowed; `vla-inference config` prints the effective values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "VLA_"
# The model families (VLA_MODEL_TYPE values); models/registry.py maps each to its class.
MODEL_TYPES = ("pi0", "openvla", "groot")


class ConfigError(ValueError):
    """An invalid VLA_* value; the message is one line for the operator."""


class Settings(BaseSettings):
    """Server settings. Field `x` is read from `VLA_X`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # --- model -----------------------------------------------------------------------------
    model_type: str = Field("pi0", description="Model family: pi0 (also pi0.5 checkpoints), openvla, groot")
    model_path: str = Field("", description="Checkpoint directory; empty serves the embedded model")
    embedded_model: Literal["metaworld", "random"] = Field(
        "metaworld",
        description="Model served when VLA_MODEL_PATH is empty: metaworld (pi0 trained in MetaWorld "
        "simulation) or random (random weights, for tests)",
    )
    device: str = Field("cpu", description="Torch device: cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight precision; auto = bfloat16 on CUDA, float32 on CPU"
    )
    chunk_size: int = Field(16, ge=1, le=1024, description="Most actions returned per chunk")
    action_dim: int = Field(
        7, ge=1, le=128, description="Action dimensions returned when the checkpoint does not say"
    )
    image_width: int = Field(224, ge=16, le=4096, description="Model input width (images are resized to it)")
    image_height: int = Field(224, ge=16, le=4096, description="Model input height")
    tokenizer_path: str = Field("", description="Tokenizer file when the checkpoint has none")
    norm_stats_key: str = Field(
        "", description="Normalisation statistics to use when a checkpoint has several"
    )
    groot_data_config: str = Field(
        "",
        description="GR00T: NVIDIA data config per embodiment, e.g. gr1:fourier_gr1_arms_only,"
        "new_embodiment:so100_dualcam; unnamed tags get the default (see README)",
    )
    num_denoise_steps: int = Field(
        0, ge=0, le=100, description="Flow-matching steps; 0 = the model's default"
    )
    pi05_prompt_state: Literal["unpadded", "padded"] = Field(
        "unpadded",
        description="pi0.5: the normalised state discretised into the prompt: unpadded (openpi, LeRobot "
        "after f0d2b37be) or padded with zeros to the model's 32 dims (pi0.5 fine-tuned with LeRobot "
        "0.4.0-0.4.4)",
    )
    compile: bool = Field(
        False,
        description="Static-shape compiled model path: torch.compile per batch bucket 1/2/4/8, CUDA "
        "graphs on a GPU; compiles at warm-up (see README)",
    )
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor",
        description="torch.compile backend of VLA_COMPILE: inductor (serving), aot_eager (the same graph "
        "capture without code generation: fast to compile, for tests), eager",
    )
    torch_threads: int = Field(
        0, ge=0, le=512, description="CPU threads for torch; 0 = torch's default (all cores)"
    )

    # --- serving ---------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="gRPC bind address (0.0.0.0 in containers)")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    max_workers: int = Field(4, ge=1, le=64, description="Threads for image decoding and preprocessing")
    max_message_size_mb: int = Field(16, ge=1, le=1024, description="Largest gRPC message, both directions")
    batch_size: int = Field(1, ge=1, le=256, description="Largest batch the engine forms")
    batch_timeout_ms: float = Field(
        2.0, ge=0, le=1000, description="Wait for a batch to fill (x5 while requests are mid-decode)"
    )
    max_queue_size: int = Field(
        64, ge=1, le=100000, description="Requests admitted at once; more get RESOURCE_EXHAUSTED"
    )
    timeout_ms: int = Field(5000, ge=1, le=3_600_000, description="Deadline for requests that set none")
    warmup_batches: int = Field(2, ge=0, le=100, description="Dummy batches run before SERVING")
    shutdown_grace_s: float = Field(
        10.0, ge=0, le=600, description="Time to finish accepted requests on SIGTERM"
    )
    stuck_after_s: float = Field(
        30.0, gt=0, le=3600, description="A forward pass longer than this turns health NOT_SERVING"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level")

    # --- real-time chunking (Observation.rtc) ---------------------------------------------------
    rtc_method: Literal["none", "guided", "hard"] = Field(
        "guided", description="Real-time chunking method when an observation's rtc.method is unspecified"
    )
    rtc_max_guidance: float = Field(
        5.0, ge=0, le=100, description="Real-time chunking: cap beta on the guidance weight (guided)"
    )
    rtc_schedule: Literal["exp", "linear", "ones"] = Field(
        "exp", description="Real-time chunking: soft-mask schedule over the overlap (guided)"
    )
    rtc_guidance_jacobian: bool = Field(
        True,
        description="Real-time chunking (guided): differentiate through the network (true, the authors' "
        "vector-Jacobian product, a backward pass per step) or hold the velocity constant (false, "
        "LeRobot's variant, no backward pass)",
    )

    # --- openpi-compatible websocket endpoint (transport/openpi/) ------------------------------
    openpi_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of the openpi-compatible websocket endpoint on VLA_HOST; empty = off, 0 = any free",
    )
    openpi_layout: Literal["auto", "droid", "libero", "aloha"] = Field(
        "auto", description="openpi observation layout; auto = detected from each observation's keys"
    )
    openpi_embodiment: str = Field(
        "", description="Embodiment for openpi observations (they carry none); empty = the model's default"
    )

    # --- input limits ----------------------------------------------------------------------
    jpeg_scaled_decode: bool = Field(
        True,
        description="Decode JPEGs at least twice the model's input size at 1/2, 1/4 or 1/8 scale "
        "(faster; pixels within ~1 grey level); false = always a full decode",
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, le=1 << 28, description="Most pixels per decoded image (checked before decoding)"
    )
    max_cameras: int = Field(4, ge=1, le=16, description="Most camera frames per observation")
    max_joints: int = Field(128, ge=1, le=4096, description="Most joint values per observation")
    max_instruction_chars: int = Field(1000, ge=1, le=100000, description="Longest language instruction")
    allow_empty_instruction: bool = Field(
        False,
        description="Accept a missing or blank language instruction (the model then sees an empty prompt); "
        "default: INVALID_ARGUMENT naming language_instruction",
    )
    max_stream_rate_hz: float = Field(
        200.0, ge=0, le=100000, description="Most observations per second per stream; 0 = unlimited"
    )

    # --- security (see SECURITY.md) ----------------------------------------------------------
    tls_cert_file: str = Field(
        "",
        validate_default=True,
        description="Server certificate chain (PEM); set with the key to enable TLS",
    )
    tls_key_file: str = Field(
        "", validate_default=True, description="Server private key (PEM) for VLA_TLS_CERT_FILE"
    )
    tls_client_ca_file: str = Field(
        "",
        validate_default=True,
        description="Client CA bundle (PEM): set = mutual TLS, clients without a cert it signed are refused",
    )
    auth_tokens: str = Field(
        "",
        repr=False,
        description="Bearer tokens accepted on every RPC, comma-separated; none at all = no token check",
    )
    auth_token_file: str = Field(
        "", description="File of accepted bearer tokens, one per line (# comments); adds to VLA_AUTH_TOKENS"
    )

    # --- metrics ---------------------------------------------------------------------------
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics")
    metrics_host: str = Field("127.0.0.1", description="Metrics bind address")
    metrics_port: int = Field(9090, ge=0, le=65535, description="Metrics port; 0 picks a free one")

    @field_validator("model_type")
    @classmethod
    def _known_model_type(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in MODEL_TYPES:
            raise ValueError(f"one of {', '.join(sorted(MODEL_TYPES))}")
        return value

    @field_validator("groot_data_config")
    @classmethod
    def _known_data_configs(cls, value: str) -> str:
        from vla_inference.models.groot.data_configs import parse_setting

        parse_setting(value)
        return value.strip()

    @field_validator("openpi_port", mode="before")
    @classmethod
    def _openpi_port_off(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("", "off", "none"):
            return None
        return value

    @field_validator("openpi_port")
    @classmethod
    def _openpi_port_free(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and value == info.data.get("grpc_port"):
            raise ValueError("a port other than VLA_GRPC_PORT (or empty to turn the endpoint off)")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value == "cpu" or value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("cpu, cuda or cuda:N")

    @field_validator("tls_cert_file", "tls_client_ca_file")
    @classmethod
    def _pem_certificate_file(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip()
        if info.field_name == "tls_client_ca_file" and value and not info.data.get("tls_cert_file"):
            raise ValueError("a client CA only together with VLA_TLS_CERT_FILE and VLA_TLS_KEY_FILE")
        if value:
            _check_pem(value, "CERTIFICATE")
        return value

    @field_validator("tls_key_file")
    @classmethod
    def _pem_key_file(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip()
        if bool(value) != bool(info.data.get("tls_cert_file")):
            raise ValueError(
                "VLA_TLS_CERT_FILE and VLA_TLS_KEY_FILE both set (TLS) or both empty (plaintext)"
            )
        if value:
            _check_pem(value, "PRIVATE KEY")
        return value

    @field_validator("auth_tokens")
    @classmethod
    def _valid_tokens(cls, value: str) -> str:
        for token in _split_tokens(value.split(",")):
            _check_token(token)
        return value

    @field_validator("auth_token_file")
    @classmethod
    def _valid_token_file(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        try:
            text = Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"a readable UTF-8 file of tokens, one per line ({type(exc).__name__})"
            ) from None
        tokens = _split_tokens(text.splitlines())
        if not tokens:
            raise ValueError("a file with at least one token (one per line)")
        for token in tokens:
            _check_token(token)
        return value

    def auth_token_list(self) -> list[str]:
        """Every accepted bearer token: VLA_AUTH_TOKENS, then the lines of VLA_AUTH_TOKEN_FILE."""
        tokens = _split_tokens(self.auth_tokens.split(","))
        if self.auth_token_file:
            tokens += _split_tokens(Path(self.auth_token_file).read_text(encoding="utf-8").splitlines())
        return list(dict.fromkeys(tokens))

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file)

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_size_mb * 1024 * 1024

    def explicitly_set(self, name: str) -> bool:
        """Whether the operator set this field (rather than it taking its default)."""
        return name in self.model_fields_set

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Read VLA_* variables; raise ConfigError naming the first bad variable."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(_one_line(exc, overrides)) from None


MIN_TOKEN_CHARS = 16
SECRET_FIELDS = frozenset({"auth_tokens"})


def _split_tokens(parts: list[str]) -> list[str]:
    tokens = [part.strip() for part in parts]
    return [token for token in tokens if token and not token.startswith("#")]


def _check_token(token: str) -> None:
    # Tokens travel in an HTTP/2 header: printable ASCII without spaces.
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ValueError("tokens of printable ASCII characters without spaces")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"tokens of at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 32`)")


def _check_pem(path: str, kind: str) -> None:
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise ValueError(f"a readable PEM file ({type(exc).__name__}: {exc.strerror or exc})") from None
    if "-----BEGIN" not in text or kind not in text:
        raise ValueError(f"a PEM file with a {kind} block")


def _one_line(exc: ValidationError, overrides: dict[str, Any]) -> str:
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else "?"
    variable = ENV_PREFIX + field.upper()
    value = overrides.get(field, os.environ.get(variable, error.get("input")))
    if field in SECRET_FIELDS:
        value = "***"  # never echo a secret into logs
    allowed = _allowed(field, error)
    return f"invalid {variable}={value!r}: expected {allowed}"


def _allowed(field: str, error: Any) -> str:
    info = Settings.model_fields.get(field)
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    if info is None:
        return message
    bounds = []
    for item in info.metadata:
        for name, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(item, name, None)
            if bound is not None:
                bounds.append(f"{word} {bound}")
    annotation = info.annotation
    optional = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    if not isinstance(annotation, type) and len(optional) == 1:
        annotation = optional[0]  # `int | None` reads as int
    kind = annotation.__name__ if isinstance(annotation, type) else None
    if error.get("type", "").endswith("_parsing") or error.get("type") in {
        "int_type",
        "float_type",
        "bool_type",
    }:
        kind_text = {"int": "a whole number", "float": "a number", "bool": "true or false"}.get(
            kind or "", kind
        )
        return f"{kind_text}{' ' + ' and '.join(bounds) if bounds else ''}"
    if bounds and error.get("type", "") in {
        "greater_than_equal",
        "less_than_equal",
        "greater_than",
        "less_than",
    }:
        return " and ".join(bounds)
    return message


def describe(settings: Settings) -> list[tuple[str, str, str]]:
    """(variable, effective value, description) for every setting, for `vla-inference config`."""
    rows = []
    for name, info in Settings.model_fields.items():
        rows.append((ENV_PREFIX + name.upper(), str(getattr(settings, name)), info.description or ""))
    return rows
