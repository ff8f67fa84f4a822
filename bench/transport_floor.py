"""The transport floor: a gRPC server that does nothing a VLA server could skip.

    python -m bench.transport_floor [--actions 16 --dims 7] [--sync]

Its Predict handler parses the Observation (as any server must) and returns a fixed ActionChunk
serialised once at start, without decoding the image or touching a model. Same framework
(grpc.aio), same message limits and loopback as `vla-inference serve`: what the benchmark's
client measures against it is what gRPC and Python cost for these bytes, the floor under our
server's own path. `--sync` serves the same handler from grpc's synchronous server and a thread
pool instead, to measure whether that framework would lower the floor (issue 15 asks). Prints
`READY <port>` and stops when stdin closes (bench.loadgen.ServerProcess).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from concurrent import futures
from typing import Any

import grpc

from vla_inference.api.v1 import vla_inference_pb2 as pb

METHOD = "/vla_inference.v1.VLAInference/Predict"
LIMIT = 16 * 1024 * 1024


def fixed_answer(actions: int, dims: int) -> bytes:
    chunk = pb.ActionChunk(
        actions=[pb.Action(joint_commands=[0.01 * (i + j) for j in range(dims)]) for i in range(actions)],
        inference_time_ms=0.1,
        confidence=1.0,
        model_name="transport-floor",
        timing=pb.TimingBreakdown(total_ms=0.1, batch_size=1),
    )
    return chunk.SerializeToString()


OPTIONS = [("grpc.max_receive_message_length", LIMIT), ("grpc.max_send_message_length", LIMIT)]


def predict_handler(predict: Any) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "vla_inference.v1.VLAInference",
        {
            "Predict": grpc.unary_unary_rpc_method_handler(
                predict,
                request_deserializer=pb.Observation.FromString,
                response_serializer=lambda raw: raw,
            )
        },
    )


async def serve(actions: int, dims: int) -> None:
    answer = fixed_answer(actions, dims)

    async def predict(request: pb.Observation, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((predict_handler(predict),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"READY {port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    await server.stop(0)


def serve_sync(actions: int, dims: int) -> None:
    answer = fixed_answer(actions, dims)

    def predict(request: pb.Observation, context: grpc.ServicerContext) -> bytes:
        return answer

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTIONS)
    server.add_generic_rpc_handlers((predict_handler(predict),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"READY {port}", flush=True)
    sys.stdin.read()  # until stdin closes
    server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actions", type=int, default=16)
    parser.add_argument("--dims", type=int, default=7)
    parser.add_argument("--sync", action="store_true", help="grpc's synchronous server, a thread pool")
    args = parser.parse_args(argv)
    if args.sync:
        serve_sync(args.actions, args.dims)
    else:
        asyncio.run(serve(args.actions, args.dims))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
