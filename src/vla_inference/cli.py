"""The `vla-inference` command: serve, predict, info, health, config, sim, convert.

A user's mistake (a missing file, a value that is not a number, a server that is down or refuses the
request) ends the command with one line on stderr and exit code 1, never a traceback; a usage error
(an unknown or missing option) with argparse's message and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from vla_inference.config import ConfigError, Settings, describe, removed_variables_set

PROG = "vla-inference"


class UserError(Exception):
    """A mistake the person at the keyboard can fix; main() prints it as one line, exit code 1."""


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _warn_removed_variables() -> None:
    for line in removed_variables_set():
        print(f"{PROG}: warning: {line}", file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    settings = _settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for line in removed_variables_set():
        logging.getLogger("vla_inference").warning("%s", line)
    from vla_inference.models.base import ModelLoadError
    from vla_inference.transport.server import VLAServer

    try:
        server = VLAServer(settings)
        asyncio.run(server.serve_forever())
    except (ModelLoadError, OSError, RuntimeError, ValueError) as exc:
        logging.getLogger("vla_inference").error("cannot serve: %s", exc)
        return 1
    return 0


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from vla_inference.client import ChannelSecurity, VLAClient

    def read(path: str, what: str) -> bytes | None:
        return _read_file(path, what) if path else None

    security = ChannelSecurity(
        token=args.token or _token_from_file(args.token_file),
        root_certificates=read(args.ca_cert, "--ca-cert"),
        certificate_chain=read(args.client_cert, "--client-cert"),
        private_key=read(args.client_key, "--client-key"),
        server_name=args.server_name,
    )
    return VLAClient(args.target, timeout=args.timeout, security=security, max_message_mb=_max_message_mb())


def _max_message_mb() -> int:
    """The client's message limit: VLA_MAX_MESSAGE_SIZE_MB when set (the server's setting), else 16."""
    value = os.environ.get("VLA_MAX_MESSAGE_SIZE_MB", "").strip()
    try:
        return max(1, int(value)) if value else 16
    except ValueError:
        raise UserError(f"VLA_MAX_MESSAGE_SIZE_MB={value!r} is not a whole number of MiB") from None


def _token_from_file(path: str) -> str:
    if not path:
        return ""
    lines = _read_file(path, "--token-file").decode("utf-8", "replace").strip().splitlines()
    if not lines:
        raise UserError(f"--token-file {path!r} is empty (expected the bearer token on its first line)")
    return lines[0].strip()


def _server_failure(exc: Any, target: str) -> str:
    """One line for a VLAError; a hint where the server could not be reached at all."""
    line = f"{exc.code_name}: {exc.message}"
    if exc.code_name == "UNAVAILABLE" and ("connect" in exc.message.lower() or "dns" in exc.message.lower()):
        line += f" (is a server running at {target}? `make run` serves on localhost:50051)"
    return line


def parse_joints(text: str) -> list[float]:
    """--joints: numbers separated by commas or spaces, or @FILE: a JSON array of numbers."""
    if text.startswith("@"):
        path = text[1:]
        raw = _read_file(path, "--joints file")
        try:
            values = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"--joints {text}: not valid JSON ({exc})") from None
        if not isinstance(values, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        ):
            raise UserError(f"--joints {text}: expected a JSON array of numbers, e.g. [0.1, 0.2, 0.3]")
        return [float(v) for v in values]
    joints = []
    for index, word in enumerate(text.replace(",", " ").split()):
        try:
            joints.append(float(word))
        except ValueError:
            raise UserError(
                f"--joints: value {index} ({word!r}) is not a number; give numbers separated by commas or "
                "spaces, or @FILE.json (a JSON array)"
            ) from None
    return joints


def parse_cameras(values: list[str]) -> dict[str, bytes]:
    """--camera NAME=FILE (repeatable): further camera images by name."""
    cameras: dict[str, bytes] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path:
            raise UserError(f"--camera {value!r}: expected NAME=FILE, e.g. --camera wrist=wrist.jpg")
        cameras[name.strip()] = _read_file(path, f"--camera {name.strip()}")
    return cameras


def _predict(args: argparse.Namespace) -> int:
    from vla_inference.client import VLAError

    image = _read_file(args.image, "--image")
    cameras = parse_cameras(args.camera)
    joints = parse_joints(args.joints) if args.joints else None
    with _client(args) as client:
        try:
            if joints is None:
                joints = _default_state(client.info(), args.embodiment)
            chunk = client.predict(
                image,
                joints,
                args.instruction,
                cameras=cameras,
                embodiment=args.embodiment,
                seed=args.seed,
                request_id="cli",
            )
        except VLAError as exc:
            raise UserError(_server_failure(exc, args.target)) from None
    out = {
        "model": chunk.model_name,
        "confidence": round(chunk.confidence, 6),
        "inference_time_ms": round(chunk.inference_time_ms, 3),
        "actions": [[round(v, 6) for v in a.joint_commands] for a in chunk.actions],
    }
    print(json.dumps(out))
    return 0


def _default_state(info: Any, embodiment: str) -> list[float]:
    """No --joints: zeros of the length the model expects for the embodiment, said on stderr."""
    tag = embodiment or info.default_embodiment
    if tag not in info.state_dims:
        tags = [t for t in info.supported_embodiments if t in info.state_dims]
        known = ", ".join(f"{t} ({info.state_dims[t]} values)" for t in tags) or "none"
        raise UserError(f"no --joints given and the model has no state length for {tag!r}; it knows: {known}")
    length = info.state_dims[tag]
    print(
        f"{PROG} predict: no --joints given: sending {length} zeros, the state length of embodiment {tag!r} "
        "(give the robot's state with --joints)",
        file=sys.stderr,
    )
    return [0.0] * length


def _model_info(args: argparse.Namespace) -> Any:
    """The server's ModelInfo (UserError when it cannot be had)."""
    from vla_inference.client import VLAError

    with _client(args) as client:
        try:
            return client.info()
        except VLAError as exc:
            raise UserError(_server_failure(exc, args.target)) from None


def _info(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    info = _model_info(args)
    print(json.dumps(json_format.MessageToDict(info), indent=2))
    return 0


def _health(args: argparse.Namespace) -> int:
    """Exit 0 only when the server answers SERVING on the standard health service."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _client(args) as client:
        try:
            stub = health_pb2_grpc.HealthStub(client.direct_channel())
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"not serving: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def wait_until_serving(args: argparse.Namespace, wait_s: float) -> None:
    """Poll the standard health service until it says SERVING (UserError after `wait_s` seconds)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + wait_s
    said = False
    last = "no answer"
    with _client(args) as client:
        stub = health_pb2_grpc.HealthStub(client.direct_channel())
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            if time.monotonic() >= deadline:
                raise UserError(
                    f"the server at {args.target} was not SERVING within --wait-s {wait_s:g} s (last: {last})"
                )
            if not said:
                print(f"{PROG} sim: waiting for {args.target} to be SERVING ({last})", file=sys.stderr)
                said = True
            time.sleep(0.5)


def _sim(args: argparse.Namespace) -> int:
    """Run MetaWorld episodes against a server and report success and smoothness."""
    from google.protobuf import json_format

    from vla_inference.client import VLAError

    try:
        from vla_inference.sim import media, robot
        from vla_inference.sim import tasks as mt
    except ImportError as exc:
        print(
            f"{PROG} sim needs the sim extra (`make sim-install`, or "
            f"pip install 'vla-inference[sim]'): {exc}",
            file=sys.stderr,
        )
        return 2
    try:
        tasks = tuple(t.name for t in mt.parse_tasks(args.tasks))
    except ValueError as exc:
        print(f"{PROG} sim: {exc}", file=sys.stderr)
        return 2
    cfg = robot.SimConfig(
        target=args.target,
        tasks=tasks,
        episodes=args.episodes,
        seed=args.seed,
        execute_steps=args.execute_steps,
        mode=args.mode,
        control_hz=args.control_hz,
        delay_steps=args.delay_steps,
        rtc=args.rtc,
        max_steps=args.max_steps,
        instruction_from=args.instruction_from,
        parallel=args.parallel,
        timeout_s=args.timeout,
        token=args.token or _token_from_file(args.token_file),
        video_dir=args.video_dir,
        video_episodes=args.video_episodes,
    )
    wait_until_serving(args, args.wait_s)
    info = _model_info(args)
    problem = robot.check_model(info)
    if problem:
        print(f"{PROG} sim: {problem}", file=sys.stderr)
        return 2
    try:
        results = robot.run(cfg)
    except VLAError as exc:
        raise UserError(_server_failure(exc, args.target)) from None
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    model = json_format.MessageToDict(info)
    summary = robot.report(
        cfg, results, {k: model.get(k) for k in ("modelName", "modelFamily", "modelVersion")}
    )
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
        print(f"{PROG} sim: wrote the report to {path}", file=sys.stderr)
    if args.video_dir:
        folder = Path(args.video_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for result in results:
            if not result.frames:
                continue
            outcome = f"{'success' if result.success else 'failure'} in {result.steps} steps"
            name = f"{result.task}-seed{result.seed}"
            gif = media.write_gif(
                result.frames, folder / f"{name}.gif", caption=f"{result.task} seed {result.seed}"
            )
            plot = media.plot_actions(
                result.actions,
                result.chunk_starts,
                folder / f"{name}-actions.png",
                title=f"{result.task} seed {result.seed}: {outcome} ({cfg.mode}); "
                "grey lines: chunk boundaries",
            )
            print(
                f"{PROG} sim: episode {result.task} seed {result.seed} ({outcome}): {gif}, {plot}",
                file=sys.stderr,
            )
    print(robot.format_table(summary))
    return 0


def _convert(args: argparse.Namespace) -> int:
    """`convert oft DIR`: OpenVLA-OFT's pickled head / projector -> safetensors beside them, once,
    offline, through torch.load(weights_only=True) (SECURITY.md); the server reads only the result."""
    from vla_inference.models.base import ModelLoadError
    from vla_inference.models.openvla import oft_checkpoint as oft

    path = Path(args.checkpoint_dir).expanduser()
    try:
        written = oft.convert_oft_checkpoint(path, overwrite=args.overwrite)
    except ModelLoadError as exc:
        raise UserError(str(exc)) from None
    for file in written:
        print(f"wrote {file}")
    config = json.loads((path / oft.OFT_CONFIG_FILE).read_text(encoding="utf-8"))
    unknown = [setting for key, setting, _ in oft.CHOSEN if config.get(key) is None]
    if unknown:
        print(
            f"{PROG} convert: action dim {config['action_dim']} / proprio dim {config['proprio_dim']} match "
            f"no upstream platform: serve with {', '.join(unknown)} set (or write the values into "
            f"{path / oft.OFT_CONFIG_FILE})",
            file=sys.stderr,
        )
    return 0


def model_input_size(settings: Settings) -> str:
    """The frame size the configured model resizes camera images to, as far as it can be known
    without loading the model: exact for the embedded models, from config.json for a checkpoint."""
    try:
        if settings.model_type == "pi0":
            from vla_inference.models.pi0.model import SIGLIP_VARIANTS

            if not settings.model_path:
                from vla_inference.models.pi0.demo import DEMO_CONFIG, METAWORLD_CHECKPOINT

                if settings.embedded_model == "random":
                    size = DEMO_CONFIG.vision.image_size
                else:
                    config = json.loads((METAWORLD_CHECKPOINT / "config.json").read_text())
                    size = SIGLIP_VARIANTS[config.get("vision_variant", "so400m")].image_size
                return f"{size}x{size} (the embedded {settings.embedded_model} model)"
            config = json.loads((Path(settings.model_path) / "config.json").read_text())
            variant = config.get("vision_variant", "so400m")
            if variant in SIGLIP_VARIANTS:
                size = SIGLIP_VARIANTS[variant].image_size
                return f"{size}x{size} (from {settings.model_path}/config.json)"
        elif settings.model_type == "openvla" and settings.model_path:
            config = json.loads((Path(settings.model_path) / "config.json").read_text())
            size = int(config.get("image_sizes", [224])[0])
            return f"{size}x{size} (from {settings.model_path}/config.json)"
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    return "set by the checkpoint when it loads (`vla-inference info`: image_width, image_height)"


def _config(args: argparse.Namespace) -> int:
    settings = _settings()
    _warn_removed_variables()
    rows = describe(settings)
    rows.append(
        ("(model input size)", model_input_size(settings), "camera frames of any size are resized to it")
    )
    width = max(len(r[0]) for r in rows)
    for variable, value, help_text in rows:
        print(f"{variable:<{width}}  {value!s:<24}  {help_text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="gRPC server for VLA robot policies")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve the model chosen by VLA_* variables").set_defaults(fn=_serve)
    sub.add_parser(
        "config", help="print the effective configuration (unset optional settings are not shown)"
    ).set_defaults(fn=_config)

    def client_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        default_target = f"localhost:{os.environ.get('VLA_GRPC_PORT', '50051')}"
        p.add_argument(
            "--target",
            default=os.environ.get("VLA_TARGET", default_target),
            help="host:port, several comma-separated (calls balanced over the healthy ones), "
            "or a gRPC URI such as dns:///name:port (default: $VLA_TARGET, else localhost:$VLA_GRPC_PORT, "
            "else localhost:50051)",
        )
        p.add_argument("--timeout", type=float, default=10.0, help="seconds")
        p.add_argument("--token", default=os.environ.get("VLA_CLIENT_TOKEN", ""), help="bearer token")
        p.add_argument("--token-file", default="", help="file whose first line is the bearer token")
        p.add_argument("--ca-cert", default="", help="CA certificate (PEM) to verify the server: enables TLS")
        p.add_argument("--client-cert", default="", help="client certificate (PEM) for mutual TLS")
        p.add_argument("--client-key", default="", help="client private key (PEM) for mutual TLS")
        p.add_argument("--server-name", default="", help="TLS: the name the server certificates carry")
        return p

    p = client_parser("predict", "send one observation and print the action chunk as JSON")
    p.add_argument("--image", required=True, help="JPEG or PNG file (main camera)")
    p.add_argument("--instruction", default="", help="language instruction")
    p.add_argument(
        "--joints",
        default="",
        help="the robot's state: numbers separated by commas or spaces, or @FILE (a JSON array of numbers); "
        "default: zeros of the length the model expects for the embodiment (said on stderr)",
    )
    p.add_argument(
        "--camera",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="a further camera's JPEG or PNG by name, e.g. wrist=wrist.jpg (repeatable)",
    )
    p.add_argument("--embodiment", default="", help="embodiment tag (default: the model's default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.set_defaults(fn=_predict)
    client_parser("info", "print the served model's description").set_defaults(fn=_info)
    p = client_parser("sim", "drive MetaWorld episodes against a server (needs the sim extra)")
    p.add_argument("--tasks", default="mt10", help="comma-separated MetaWorld tasks, or mt10")
    p.add_argument("--episodes", type=int, default=20, help="episodes per task")
    p.add_argument("--seed", type=int, default=1000, help="first episode seed (demonstrations use 0-999)")
    p.add_argument("--json", default="", help="write the report here (folders are created)")
    p.add_argument("--execute-steps", type=int, default=4, help="actions executed per chunk (K)")
    p.add_argument("--mode", choices=("lockstep", "realtime"), default="lockstep")
    p.add_argument("--control-hz", type=float, default=80.0, help="realtime: control rate (0: no latency)")
    p.add_argument("--delay-steps", type=int, default=0, help="realtime: extra inference delay, in steps")
    p.add_argument(
        "--rtc",
        choices=("none", "guided", "hard"),
        default="",
        help="real-time chunking method to ask for (default: send no rtc fields)",
    )
    p.add_argument("--max-steps", type=int, default=300, help="steps before an episode counts as failed")
    p.add_argument(
        "--instruction-from", choices=("task", "other"), default="task", help="other: another task's words"
    )
    p.add_argument("--parallel", type=int, default=1, help="worker processes")
    p.add_argument(
        "--video-dir",
        default="",
        help="write <task>-seed<N>.gif (the frames sent) and <task>-seed<N>-actions.png (the executed "
        "actions) here, for the first --video-episodes episodes of each task",
    )
    p.add_argument(
        "--video-episodes", type=int, default=1, help="episodes per task with a GIF and plot (default 1)"
    )
    p.add_argument(
        "--wait-s",
        type=float,
        default=60.0,
        help="wait up to this long for the server to be SERVING (e.g. right after `make run &`)",
    )
    p.set_defaults(fn=_sim)
    client_parser("health", "exit 0 when the server is SERVING (container probe)").set_defaults(fn=_health)
    p = sub.add_parser("convert", help="convert a checkpoint's pickled files to safetensors, once, offline")
    formats = p.add_subparsers(dest="format", required=True)
    p = formats.add_parser(
        "oft",
        help="OpenVLA-OFT: action_head--*_checkpoint.pt and proprio_projector--*_checkpoint.pt -> "
        ".safetensors beside them, plus oft_config.json (read with torch.load(weights_only=True); "
        "SECURITY.md)",
    )
    p.add_argument(
        "checkpoint_dir", help="the OpenVLA-OFT checkpoint directory (the .pt files beside the merged model)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace earlier converted files")
    p.set_defaults(fn=_convert)
    return parser


def _quiet_broken_pipe() -> None:
    """The reader of stdout went away (`vla-inference info | head`): no traceback at exit either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.fn(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except UserError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. --json or --video-dir not writable
        if isinstance(exc, BrokenPipeError):
            _quiet_broken_pipe()
            return 1
        where = f" {exc.filename!r}" if exc.filename else ""
        print(f"{PROG} {args.command}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
