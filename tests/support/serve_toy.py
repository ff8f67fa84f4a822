"""Serve ToyPolicy as a real process, the way `vla-inference serve` does (VLAServer.serve_forever,
signal handlers, drain), on an ephemeral port. Prints `PORT <n>` once SERVING.

    python -m tests.support.serve_toy [--grace S] [--batch-cost S] [--batch-size N] [--name NAME]

Other settings come from VLA_* variables as usual. Exit status 0 after a clean drain.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from tests.support.toy_model import ToyPolicy
from vla_inference.config import Settings
from vla_inference.transport.server import VLAServer
from vla_inference.transport.servicer import ServerState


async def main(args: argparse.Namespace) -> None:
    settings = Settings.from_env(
        grpc_port=0,
        metrics_port=0,
        warmup_batches=1,
        shutdown_grace_s=args.grace,
        batch_size=args.batch_size,
        batch_timeout_ms=5.0,
    )
    server = VLAServer(settings, ToyPolicy(settings, batch_cost_s=args.batch_cost, name=args.name))
    serving = asyncio.create_task(server.serve_forever())
    while server.state.phase != ServerState.SERVING and not serving.done():
        await asyncio.sleep(0.01)
    if not serving.done():
        print(f"PORT {server.port}", flush=True)
    await serving


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--batch-cost", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--name", default="toy-policy", help="model name in answers (tells replicas apart)")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    asyncio.run(main(parser.parse_args()))
