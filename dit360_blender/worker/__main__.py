"""The DiT360 model worker: ``python -m dit360_blender.worker --log-dir DIR --parent-pid PID``.

On a GPU machine of its own: ``python -m dit360_blender.worker --serve [--port N] [--token-file F]
[--models-dir DIR]`` (worker/serve.py): loopback only, reached through an SSH tunnel, serving one
client at a time until stopped (Ctrl-C); its token is written to F (0600) and printed.

Started by `dit360_blender.client`, which sets the launch token in the DIT360_WORKER_TOKEN environment
variable (never argv). Order matters for start-up time: the socket is bound and its port announced
before torch is imported, so the client connects (and hears `ready`) while the slow import runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..protocol import PORT_ANNOUNCE, TOKEN_ENV
from ..redact import env_secrets
from .logs import ClientLogHandler, setup_logging
from .process import finish
from .serve_main import serve_args, serve_main
from .server import HANDSHAKE_TIMEOUT_S, Worker

logger = logging.getLogger("dit360_blender.worker")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dit360_blender.worker", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--log-dir", type=Path, help="folder for worker.log (--serve: also jobs and uploads)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process dies")
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=HANDSHAKE_TIMEOUT_S,
        help="a connection must say hello within this (s)",
    )
    parser.add_argument(
        "--accept-timeout", type=float, default=300.0, help="exit if no client authenticates within this (s)"
    )
    serve_args(parser)
    args = parser.parse_args(argv)
    if args.log_dir is None and not args.serve:
        parser.error("--log-dir is required (it is optional with --serve)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.serve:
        return serve_main(args)
    token = os.environ.pop(TOKEN_ENV, "")  # not inherited by anything this process starts
    if len(token) < 16:
        print(f"{TOKEN_ENV} is not set: the worker is started by dit360_blender.client.", file=sys.stderr)
        return 2
    secrets = [token, *env_secrets()]
    log_path = setup_logging(args.log_dir, secrets)
    logger.info(
        "worker starting (pid %d, parent %s, python %s, package %s)",
        os.getpid(), args.parent_pid, sys.executable, Path(__file__).resolve().parents[1],
    )  # fmt: skip
    try:
        worker = Worker(token, secrets, args.accept_timeout, args.handshake_timeout)
        port = worker.listen()
    except BaseException:
        logger.exception("the worker could not start")
        return finish(3)
    worker.watch(args.parent_pid)
    print(f"{PORT_ANNOUNCE} {port}", flush=True)  # the client connects while torch is imported
    logging.getLogger().addHandler(ClientLogHandler(worker.send, secrets))
    try:
        worker.start_jobs(log_path)
    except BaseException as exc:
        logger.exception("the worker could not load torch and the pipeline")
        worker.fail_start(exc)
        return finish(3)
    try:
        code = worker.run_jobs()
    except BaseException:
        logger.exception("the worker failed")
        code = 3
    return finish(code)


if __name__ == "__main__":
    raise SystemExit(main())
