"""The transport floor: a gRPC server that does nothing a VLA server could skip.

    python -m bench.transport_floor [--actions 16 --dims 7]

Its Predict handler parses the Observation (as any server must) and returns a fixed ActionChunk
serialised once at start, without decoding the image or touching a model. Same framework
(grpc.aio), same message limits and loopback as `vla-inference serve`: what the benchmark's
client measures against it is what gRPC and Python cost for these bytes, the floor under our
server's own path. Prints `READY <port>` and stops when stdin closes (bench.loadgen.ServerProcess).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

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


async def serve(actions: int, dims: int) -> None:
    answer = fixed_answer(actions, dims)

    async def predict(request: pb.Observation, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    handler = grpc.method_handlers_generic_handler(
        "vla_inference.v1.VLAInference",
        {
            "Predict": grpc.unary_unary_rpc_method_handler(
                predict,
                request_deserializer=pb.Observation.FromString,
                response_serializer=lambda raw: raw,
            )
        },
    )
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", LIMIT), ("grpc.max_send_message_length", LIMIT)]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"READY {port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actions", type=int, default=16)
    parser.add_argument("--dims", type=int, default=7)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.actions, args.dims))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
