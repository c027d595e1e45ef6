"""Serve an OpenAI-compatible HTTP API (completions, chat, streaming) on rank 0; the other ranks
run the engine's steps.

    torchrun --nproc_per_node N launch/serve.py --config CONFIG
    python launch/serve.py --config configs/smollm2-135m.yaml              # one process: http://127.0.0.1:8000
    torchrun --nproc_per_node 3 launch/serve.py --config configs/smollm2-135m.yaml --set server.port=8001

Then: curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
          -d '{"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'
With parallel.dp = D replicas (polar_dist/parallel/context.py), replica r's driver serves on
server.port + r; launch/cluster.py starts each replica as a job of its own (parallel.replica = r),
so that one replica's failure leaves the others serving (README, "Several nodes"). SIGINT/SIGTERM to rank 0 drains (503 to new requests, up to server.drain_timeout_s for those in flight)
and every rank exits 0. The API key: server.api_key, or POLAR_API_KEY.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from polar_dist.cli import add_config_args, config_from_args, run_main  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    args = parser.parse_args()
    cfg = config_from_args(args)

    from polar_dist import envs
    from polar_dist.log import configure_logging
    from polar_dist.parallel.context import init_parallel
    from polar_dist.runtime import build_runtime
    from polar_dist.server.serve import serve

    ctx = init_parallel(cfg.parallel, cfg.model.device)
    configure_logging(ctx.tp_rank, ctx.tp_size, ctx.replica, ctx.num_replicas)
    rt = build_runtime(cfg, ctx)
    serve(rt, api_key=cfg.server.api_key or envs.API_KEY.get())
    ctx.shutdown()


if __name__ == "__main__":
    run_main(main)
