"""Configuration: every `VLA_*` environment variable, its default and what is allowed.

The single source of truth for settings. `Settings.from_env()` validates everything at
start-up and raises `ConfigError` with one line naming the variable, the value and what is
allowed; `vla-inference config` prints the effective values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "VLA_"
# The model families (VLA_MODEL_TYPE values); models/registry.py maps each to its class.
MODEL_TYPES = ("pi0", "openvla", "groot", "smolvla")


class ConfigError(ValueError):
    """An invalid VLA_* value; the message is one line for the operator."""


class Settings(BaseSettings):
    """Server settings. Field `x` is read from `VLA_X`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # --- model -----------------------------------------------------------------------------
    model_type: str = Field(
        "pi0",
        description="Model family: pi0 (pi0, pi0.5 and pi0-FAST checkpoints), openvla (OpenVLA and "
        "OpenVLA-OFT), groot (GR00T N1.5 and N1.7, told apart by config.json's model_type), smolvla "
        "(docs/models.md)",
    )
    model_path: str = Field("", description="Checkpoint directory; empty serves the embedded model")
    embedded_model: Literal["metaworld", "random"] = Field(
        "metaworld",
        description="What an empty VLA_MODEL_PATH serves: metaworld (pi0 trained in MetaWorld "
        "simulation) or random (random weights, for tests)",
    )
    device: str = Field("cpu", description="Torch device: cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weight precision: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16",
    )
    chunk_size: int = Field(
        16,
        ge=1,
        le=1024,
        description="Most actions per chunk: a chunk is min(VLA_CHUNK_SIZE, the model's horizon) actions "
        "(OpenVLA: always 1)",
    )
    action_dim: int = Field(
        7,
        ge=1,
        le=128,
        description="Action dimensions when the checkpoint does not say; a value that contradicts the "
        "checkpoint stops the server at start",
    )
    num_denoise_steps: int = Field(
        0, ge=0, le=100, description="Flow-matching steps; 0 = the model's default (pi0: 10, GR00T: 4)"
    )
    tokenizer_path: str = Field(
        "",
        description="Tokenizer file when the checkpoint has none (GR00T N1.7: the directory with its "
        "backbone's tokenizer, chat template and image processor files)",
    )
    norm_stats_key: str = Field(
        "",
        description="Which statistics (or OpenVLA unnorm_key) to use when a checkpoint has several and the "
        "embodiment tag does not pick one; SmolVLA: the dataset key of a checkpoint that keeps its "
        "statistics per training dataset (the base checkpoint), which is refused without one",
    )
    groot_data_config: str = Field(
        "",
        description="GR00T N1.5: NVIDIA data config per embodiment, tag:config[,tag:config], e.g. "
        "new_embodiment:so100_dualcam; unnamed tags get the defaults (docs/models.md; N1.7 reads its "
        "processor_config.json)",
    )
    pi05_prompt_state: Literal["unpadded", "padded"] = Field(
        "unpadded",
        description="pi0.5: the normalised state discretised into the prompt: unpadded (openpi, LeRobot "
        "after 0.4.4) or padded with zeros to the model's 32 dims (pi0.5 fine-tuned with LeRobot "
        "0.4.0-0.4.4)",
    )
    openvla_variant: Literal["auto", "openvla", "oft"] = Field(
        "auto",
        description="openvla family: auto (OpenVLA-OFT when an action_head--*_checkpoint file lies beside "
        "the merged weights, else OpenVLA), openvla, oft",
    )
    oft_chunk_size: int = Field(
        0,
        ge=0,
        le=1024,
        description="OpenVLA-OFT: actions the model decodes per pass (upstream's NUM_ACTIONS_CHUNK); 0 = "
        "oft_config.json's, else upstream's platform table by action / proprio dims (LIBERO 8)",
    )
    oft_num_images: int = Field(
        0,
        ge=0,
        le=3,
        description="OpenVLA-OFT: cameras the model sees (num_images_in_input: base, left_wrist, right_wrist "
        "in that order); 0 = oft_config.json's, else upstream's table (LIBERO 2)",
    )
    oft_normalization: Literal["auto", "bounds_q99", "bounds"] = Field(
        "auto",
        description="OpenVLA-OFT: proprio / action normalisation, bounds_q99 (q01/q99) or bounds (min/max); "
        "auto = oft_config.json's, else upstream's table",
    )
    fast_max_tokens: int = Field(
        0,
        ge=0,
        le=4096,
        description="pi0-FAST: most tokens one decode writes per request ('Action: ', the action tokens "
        "and '|'); a request whose answer has no '|' by then fails alone (INTERNAL); 0 = the "
        "checkpoint's max_decoding_steps (LeRobot: 256)",
    )
    fast_temperature: float | None = Field(
        None,
        ge=0.0,
        le=10.0,
        description="pi0-FAST: sampling temperature; 0 = greedy; empty = the checkpoint's (LeRobot's "
        "default 0: greedy). Sampled requests draw from their own seed",
    )
    fast_tokenizer_path: str = Field(
        "",
        description="pi0-FAST: the FAST action tokenizer directory (processor_config.json, bpe_tokenizer/) "
        "when the checkpoint has no action_tokenizer/; its .py file is never run",
    )
    compile: bool = Field(
        False,
        description="Serve through the static-shape compiled model path: torch.compile per batch bucket "
        "(1, 2, 4, 8), CUDA graphs on a GPU; compiles during warm-up (docs/models.md)",
    )
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor",
        description="torch.compile backend of VLA_COMPILE: inductor (serving), aot_eager (the same graph "
        "capture without code generation: fast to compile, for tests), eager",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        le=512,
        description="CPU threads for torch; 0 = torch's default (one per core). On a CPU box shared with "
        "other busy processes, 1 keeps latency steady",
    )
    allow_empty_instruction: bool = Field(
        False,
        description="A missing or blank language_instruction is INVALID_ARGUMENT for models that read "
        "language (every served family); true = serve it with the model's behaviour for an empty prompt, "
        "logging a warning once per stream",
    )

    # --- serving ---------------------------------------------------------------------------
    host: str = Field(
        "127.0.0.1",
        description="Bind address of gRPC, the openpi and the GR00T endpoints (the Docker image and Helm "
        "chart set 0.0.0.0; see SECURITY.md first)",
    )
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 = any free port")
    max_workers: int = Field(
        4,
        ge=1,
        le=64,
        description="Threads for image decoding and preprocessing: one does the work, the others step in "
        "behind a slow decode (at most one per core the server may run on besides the event loop's, at "
        "least 2 unless set to 1)",
    )
    max_message_size_mb: int = Field(
        16,
        ge=1,
        le=1024,
        description="Largest gRPC message, both directions (the Python client checks "
        "images against it before sending)",
    )
    batch_size: int = Field(1, ge=1, le=256, description="Largest batch the engine forms across robots")
    batch_timeout_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="Wait for a batch to fill, counted from the oldest queued request's arrival or the "
        "model coming free, whichever is later. Skipped when every request of the recent fleet (the most in "
        "flight at once) is queued; stretched up to 5x while admitted requests are still being decoded, or, "
        "for a closed-loop fleet that comes back within the forward pass's measured fixed cost, until the "
        "whole fleet is queued (at most that cost), so that it does not split into alternating part batches",
    )
    max_queue_size: int = Field(
        64, ge=1, le=100000, description="Requests admitted at once; more get RESOURCE_EXHAUSTED at once"
    )
    timeout_ms: int = Field(
        5000,
        ge=1,
        le=3_600_000,
        description="Deadline for requests whose client sets none (and per stream observation)",
    )
    warmup_batches: int = Field(2, ge=0, le=100, description="Dummy batches run before health turns SERVING")
    shutdown_grace_s: float = Field(
        10.0, ge=0, le=600, description="Time to answer accepted requests after SIGTERM"
    )
    stuck_after_s: float = Field(
        30.0, gt=0, le=3600, description="A forward pass longer than this turns health NOT_SERVING"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG, INFO, WARNING, ERROR"
    )

    # --- real-time chunking (Observation.rtc) ---------------------------------------------------
    rtc_method: Literal["none", "guided", "hard"] = Field(
        "guided",
        description="Real-time chunking method for observations whose rtc.method is unspecified (none, "
        "guided, hard); applies only to observations that send rtc and to models that support it",
    )
    rtc_max_guidance: float = Field(
        5.0, ge=0, le=100, description="Real-time chunking: cap beta on the guidance weight (guided)"
    )
    rtc_schedule: Literal["exp", "linear", "ones"] = Field(
        "exp", description="Real-time chunking: soft-mask schedule over the overlap (exp, linear, ones)"
    )
    rtc_guidance_jacobian: bool = Field(
        True,
        description="Real-time chunking, guided: differentiate through the network (true: the authors' "
        "vector-Jacobian product, one backward pass per denoising step) or hold the velocity constant "
        "(false: LeRobot's variant, no backward pass); docs/evaluation.md measures both",
    )

    # --- openpi-compatible websocket endpoint (transport/openpi/) ------------------------------
    openpi_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of the openpi-compatible websocket endpoint on VLA_HOST (docs/clients.md); "
        "empty = off, 0 = any free port",
    )
    openpi_layout: Literal["auto", "droid", "libero", "aloha"] = Field(
        "auto",
        description="openpi observation layout: auto (from each observation's keys), droid, libero, aloha",
    )
    openpi_embodiment: str = Field(
        "", description="Embodiment for openpi observations (they name none); empty = the model's default"
    )

    # --- GR00T's ZeroMQ inference-service endpoint (transport/groot_zmq/) -----------------------
    groot_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of the endpoint speaking Isaac-GR00T's ZeroMQ inference-service protocol on "
        "VLA_HOST (docs/clients.md; NVIDIA's PolicyClient / RobotInferenceClient); empty = off, 0 = any "
        "free port",
    )
    groot_embodiment: str = Field(
        "",
        description="Embodiment of the GR00T endpoint's observations and modality config (upstream's "
        "--embodiment-tag); empty = per observation, the first embodiment (the model's default first) "
        "whose state keys it carries",
    )

    # --- input limits ----------------------------------------------------------------------
    jpeg_scaled_decode: bool = Field(
        True,
        description="A JPEG at least twice the model's input size is decoded at 1/2, 1/4 or 1/8 scale "
        "(libjpeg-turbo's DCT scaling), about half the decode-and-resize time; pixels within ~1 grey level "
        "of a full decode (less than the JPEG's own error). false: always a full decode (bit-exact "
        "upstream preprocessing of JPEG frames)",
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        le=1 << 28,
        description="Most pixels per decoded image, checked from the header before decoding",
    )
    max_cameras: int = Field(4, ge=1, le=16, description="Most camera frames per observation")
    max_joints: int = Field(128, ge=1, le=4096, description="Most joint values per observation")
    max_instruction_chars: int = Field(1000, ge=1, le=100000, description="Longest language instruction")
    max_stream_rate_hz: float = Field(
        200.0, ge=0, le=100000, description="Most observations per second per stream; 0 = unlimited"
    )

    # --- security (see SECURITY.md) ----------------------------------------------------------
    tls_cert_file: str = Field(
        "",
        validate_default=True,
        description="Server certificate chain (PEM); set with VLA_TLS_KEY_FILE to enable TLS",
    )
    tls_key_file: str = Field(
        "", validate_default=True, description="Server private key (PEM) for VLA_TLS_CERT_FILE"
    )
    tls_client_ca_file: str = Field(
        "",
        validate_default=True,
        description="CA for client certificates: set = mutual TLS (needs TLS), clients without a "
        "certificate it signed are refused",
    )
    auth_tokens: str = Field(
        "",
        repr=False,
        description="Comma-separated bearer tokens (16+ characters); every RPC but the standard health "
        "service and reflection then needs `authorization: Bearer <token>`, the openpi endpoint "
        "`Authorization: Api-Key <token>`, the GR00T endpoint `api_token` in each request; none = no "
        "token check",
    )
    auth_token_file: str = Field(
        "", description="File of bearer tokens, one per line (# comments); adds to VLA_AUTH_TOKENS"
    )

    # --- metrics ---------------------------------------------------------------------------
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics")
    metrics_host: str = Field("127.0.0.1", description="Metrics bind address")
    metrics_port: int = Field(
        9090,
        ge=0,
        le=65535,
        description="Metrics port; 0 = any free port. 9090 is also Prometheus's own default port: on a "
        "host that runs Prometheus, set another",
    )

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

    @field_validator("openpi_port", "groot_port", "fast_temperature", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("", "off", "none"):
            return None
        return value

    @field_validator("openpi_port")
    @classmethod
    def _openpi_port_free(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and value == info.data.get("grpc_port"):
            raise ValueError("a port other than VLA_GRPC_PORT (or empty to turn the endpoint off)")
        return value

    @field_validator("groot_port")
    @classmethod
    def _groot_port_free(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and value in (info.data.get("grpc_port"), info.data.get("openpi_port")):
            raise ValueError(
                "a port other than VLA_GRPC_PORT and VLA_OPENPI_PORT (or empty to turn the endpoint off)"
            )
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
    """(variable, effective value, description) for `vla-inference config`: every setting but the
    optional ones left unset (an openpi or GR00T port of None: the endpoint is off); secrets masked."""
    rows = []
    for name, info in Settings.model_fields.items():
        value = getattr(settings, name)
        if value is None:
            continue
        shown = "***" if (name in SECRET_FIELDS and value) else str(value)
        rows.append((ENV_PREFIX + name.upper(), shown, info.description or ""))
    return rows


# Variables earlier versions read that no longer do anything: set, they get a warning at start.
REMOVED_VARIABLES = {
    "VLA_IMAGE_WIDTH": "the model's input size comes from its checkpoint (GetModelInfo image_width / "
    "image_height); frames of any size are resized to it",
    "VLA_IMAGE_HEIGHT": "the model's input size comes from its checkpoint (GetModelInfo image_width / "
    "image_height); frames of any size are resized to it",
}


def removed_variables_set(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning line per variable of REMOVED_VARIABLES found in the environment."""
    env = os.environ if environ is None else environ
    return [
        f"{name} is set but has no effect: {why}" for name, why in REMOVED_VARIABLES.items() if name in env
    ]


# --- docs/configuration.md: the settings table, generated from the fields above ---------------------
# Each section starts at its first field (the fields are declared in section order).
SECTIONS: dict[str, str] = {
    "model_type": "Model",
    "host": "Serving",
    "rtc_method": "Real-time chunking",
    "openpi_port": "openpi endpoint",
    "groot_port": "GR00T ZeroMQ endpoint",
    "jpeg_scaled_decode": "Input limits",
    "tls_cert_file": "Security (SECURITY.md)",
    "metrics_enabled": "Metrics",
}
MARKDOWN_BEGIN = "<!-- BEGIN settings table: generated by `python -m vla_inference.config --write` -->"
MARKDOWN_END = "<!-- END settings table -->"


def _default_text(name: str) -> str:
    info = Settings.model_fields[name]
    default = info.default
    if default is None or default == "":
        return "(empty)"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return f"`{default}`"


def markdown_table() -> str:
    """Every setting, by section: variable, default, meaning (from the Field descriptions)."""
    lines: list[str] = []
    for name, info in Settings.model_fields.items():
        if name in SECTIONS:
            if lines:
                lines.append("")
            lines += [f"### {SECTIONS[name]}", "", "| variable | default | meaning |", "|---|---|---|"]
        meaning = (info.description or "").replace("|", "\\|")
        lines.append(f"| `{ENV_PREFIX}{name.upper()}` | {_default_text(name)} | {meaning} |")
    return "\n".join(lines) + "\n"


def render_markdown(document: str) -> str:
    """`document` with the text between MARKDOWN_BEGIN and MARKDOWN_END replaced by markdown_table()."""
    head, begin, rest = document.partition(MARKDOWN_BEGIN)
    _, end, tail = rest.partition(MARKDOWN_END)
    if not begin or not end:
        raise ValueError(f"the document needs the lines {MARKDOWN_BEGIN!r} and {MARKDOWN_END!r}")
    return f"{head}{MARKDOWN_BEGIN}\n\n{markdown_table()}\n{MARKDOWN_END}{tail}"


DOCS_CONFIGURATION = Path("docs") / "configuration.md"


def main(argv: list[str] | None = None) -> int:
    """`python -m vla_inference.config --markdown` prints the settings table;
    `--write [FILE]` regenerates it in FILE (default docs/configuration.md, run from the repository root)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vla_inference.config", description=main.__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true", help="print the settings table (markdown)")
    group.add_argument("--write", nargs="?", const=str(DOCS_CONFIGURATION), metavar="FILE")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table(), end="")
        return 0
    path = Path(args.write)
    path.write_text(render_markdown(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
