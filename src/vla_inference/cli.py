"""The `vla-inference` command: serve, predict, info, health, config, sim."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from vla_inference.config import ConfigError, Settings, describe


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        print(f"vla-inference: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(args: argparse.Namespace) -> int:
    settings = _settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from vla_inference.models.base import ModelLoadError
    from vla_inference.transport.server import VLAServer

    try:
        server = VLAServer(settings)
        asyncio.run(server.serve_forever())
    except (ModelLoadError, OSError, RuntimeError, ValueError) as exc:
        logging.getLogger("vla_inference").error("cannot serve: %s", exc)
        return 1
    return 0


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from vla_inference.client import ChannelSecurity, VLAClient

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    security = ChannelSecurity(
        token=args.token or _token_from_file(args.token_file),
        root_certificates=read(args.ca_cert),
        certificate_chain=read(args.client_cert),
        private_key=read(args.client_key),
        server_name=args.server_name,
    )
    return VLAClient(args.target, timeout=args.timeout, security=security)


def _token_from_file(path: str) -> str:
    return Path(path).read_text().strip().splitlines()[0] if path else ""


def _predict(args: argparse.Namespace) -> int:
    import grpc

    joints = [float(x) for x in args.joints.replace(",", " ").split()] if args.joints else []
    image = Path(args.image).read_bytes()
    with _client(args) as client:
        try:
            chunk = client.predict(
                image, joints, args.instruction, embodiment=args.embodiment, seed=args.seed, request_id="cli"
            )
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    out = {
        "model": chunk.model_name,
        "confidence": round(chunk.confidence, 6),
        "inference_time_ms": round(chunk.inference_time_ms, 3),
        "actions": [[round(v, 6) for v in a.joint_commands] for a in chunk.actions],
    }
    print(json.dumps(out))
    return 0


def _model_info(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The server's ModelInfo, or None after printing why it could not be had."""
    import grpc

    with _client(args) as client:
        try:
            return client.info()
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return None


def _info(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    info = _model_info(args)
    if info is None:
        return 1
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


def _sim(args: argparse.Namespace) -> int:
    """Run MetaWorld episodes against a server and report success and smoothness."""
    import grpc
    from google.protobuf import json_format

    try:
        from vla_inference.sim import media, robot
        from vla_inference.sim import tasks as mt
    except ImportError as exc:
        print(
            f"vla-inference sim needs the sim extra (pip install 'vla-inference[sim]'): {exc}",
            file=sys.stderr,
        )
        return 2
    try:
        tasks = tuple(t.name for t in mt.parse_tasks(args.tasks))
    except ValueError as exc:
        print(f"vla-inference sim: {exc}", file=sys.stderr)
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
    )
    info = _model_info(args)
    if info is None:
        return 1
    problem = robot.check_model(info)
    if problem:
        print(f"vla-inference sim: {problem}", file=sys.stderr)
        return 2
    try:
        results = robot.run(cfg)
    except (grpc.RpcError, RuntimeError) as exc:
        detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
        print(f"vla-inference sim: {detail}", file=sys.stderr)
        return 1
    model = json_format.MessageToDict(info)
    summary = robot.report(
        cfg, results, {k: model.get(k) for k in ("modelName", "modelFamily", "modelVersion")}
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if args.video_dir:
        folder = Path(args.video_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for name in tasks:
            first = next(r for r in results if r.task == name)
            media.write_gif(first.frames, folder / f"{name}-seed{first.seed}.gif")
            media.plot_actions(
                first.actions,
                first.chunk_starts,
                folder / f"{name}-seed{first.seed}-actions.png",
                title=f"{name} seed {first.seed}: {'success' if first.success else 'failure'} in "
                f"{first.steps} steps ({cfg.mode}); grey lines: chunk boundaries",
            )
    print(robot.format_table(summary))
    return 0


def _config(args: argparse.Namespace) -> int:
    settings = _settings()
    rows = describe(settings)
    width = max(len(r[0]) for r in rows)
    for variable, value, help_text in rows:
        shown = "***" if (variable == "VLA_AUTH_TOKENS" and value) else value
        print(f"{variable:<{width}}  {shown!s:<24}  {help_text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-inference", description="gRPC server for VLA robot policies")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve the model chosen by VLA_* variables").set_defaults(fn=_serve)
    sub.add_parser("config", help="print the effective configuration").set_defaults(fn=_config)

    def client_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        default_target = f"localhost:{os.environ.get('VLA_GRPC_PORT', '50051')}"
        p.add_argument(
            "--target",
            default=os.environ.get("VLA_TARGET", default_target),
            help="host:port, several comma-separated (calls balanced over the healthy ones), "
            "or a gRPC URI such as dns:///name:port",
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
    p.add_argument("--joints", default="", help="joint positions, comma or space separated")
    p.add_argument("--embodiment", default="", help="embodiment tag")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.set_defaults(fn=_predict)
    client_parser("info", "print the served model's description").set_defaults(fn=_info)
    p = client_parser("sim", "drive MetaWorld episodes against a server (needs the sim extra)")
    p.add_argument("--tasks", default="mt10", help="comma-separated MetaWorld tasks, or mt10")
    p.add_argument("--episodes", type=int, default=20, help="episodes per task")
    p.add_argument("--seed", type=int, default=1000, help="first episode seed (demonstrations use 0-999)")
    p.add_argument("--json", default="", help="write the report here")
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
    p.add_argument("--video-dir", default="", help="write a GIF and an action plot per task here")
    p.set_defaults(fn=_sim)
    client_parser("health", "exit 0 when the server is SERVING (container probe)").set_defaults(fn=_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
