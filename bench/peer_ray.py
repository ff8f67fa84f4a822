"""The peer: the same model callable served by Ray Serve with @serve.batch, gRPC ingress.

    python -m bench.peer_ray --batch-size 8 --batch-wait-ms 2

Ray Serve's gRPC proxy serves our own VLAInference proto (Predict), so the load generator and
the wire format are identical to ours; only the serving stack differs. The replica does what
our server does per request: decode the JPEG with the same codec, model.prepare(), then a
@serve.batch method runs model.predict_batch() (forward + finish) off the replica's event loop.
Model settings come from VLA_* variables. Prints `READY <port>`; closing stdin shuts Ray down.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

APP = "vla"
SERVICER = "vla_inference.api.v1.vla_inference_pb2_grpc.add_VLAInferenceServicer_to_server"


def build_app(batch_size: int, batch_wait_s: float, threads: int):  # type: ignore[no-untyped-def]
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    class VLADeployment:
        def __init__(self) -> None:
            import torch

            from vla_inference.config import Settings
            from vla_inference.models.registry import create_model

            torch.set_num_threads(threads)
            self.settings = Settings.from_env()
            self.model = create_model(self.settings)
            self.model.load(self.settings.model_path or None, "cpu")
            self.info = self.model.model_info
            sample = self.model.prepare(self.model.warmup_observation())
            self.model.predict_batch([sample])
            self.model.predict_batch([sample] * batch_size)

        async def Predict(self, request):  # type: ignore[no-untyped-def]
            from vla_inference.api.v1 import vla_inference_pb2 as pb
            from vla_inference.transport import codec

            t0 = time.monotonic()
            observation = codec.observation_from_proto(request, self.settings, self.info)
            sample = self.model.prepare(observation)
            prediction = await self.batched(sample)
            return pb.ActionChunk(
                actions=[pb.Action(joint_commands=row) for row in prediction.actions.tolist()],
                confidence=prediction.confidence,
                request_id=request.request_id,
                observation_timestamp=request.timestamp,
                model_name=self.info.name,
                inference_time_ms=(time.monotonic() - t0) * 1000,
            )

        async def GetModelInfo(self, request):  # type: ignore[no-untyped-def]
            from vla_inference.transport import codec

            return codec.model_info_message(
                self.info, self.settings.model_copy(update={"batch_size": batch_size})
            )

        @serve.batch(max_batch_size=batch_size, batch_wait_timeout_s=batch_wait_s)
        async def batched(self, samples):  # type: ignore[no-untyped-def]
            import asyncio

            return await asyncio.to_thread(self.model.predict_batch, samples)

    return VLADeployment.bind()


def _wait_routable(target: str, limit_s: float = 60.0) -> None:
    """The proxy learns about the application a moment after serve.run returns: wait for it."""
    import grpc
    from google.protobuf import empty_pb2

    from vla_inference.api.v1 import vla_inference_pb2_grpc as pb_grpc

    end = time.monotonic() + limit_s
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.VLAInferenceStub(channel)
        while True:
            try:
                stub.GetModelInfo(empty_pb2.Empty(), timeout=10, metadata=(("application", APP),))
                return
            except grpc.RpcError as exc:
                if time.monotonic() > end:
                    raise RuntimeError(f"Ray Serve gRPC proxy never routed to {APP!r}: {exc}") from None
                time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_ray")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the replica (0 = all cores)")
    args = parser.parse_args(argv)

    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from bench.common import LOOPBACK, free_port

    threads = args.threads or (os.cpu_count() or 1)
    grpc_port = free_port()
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address=LOOPBACK,
    )
    serve.start(
        http_options={"host": LOOPBACK, "port": free_port()},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[SERVICER]),
    )
    serve.run(
        build_app(args.batch_size, args.batch_wait_ms / 1000, threads), name=APP, route_prefix="/" + APP
    )
    _wait_routable(f"{LOOPBACK}:{grpc_port}")
    print(f"READY {grpc_port}", flush=True)
    try:
        sys.stdin.read()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
