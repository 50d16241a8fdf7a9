"""``python -m dit360_blender.worker --serve``: the command line of a serving worker (serve.py)."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path

from ..launch import private_dir
from ..redact import env_secrets
from .logs import ClientLogHandler, setup_logging
from .process import finish

logger = logging.getLogger("dit360_blender.worker")

TOKEN_LINE = "DIT360_WORKER_TOKEN_FILE"  # "DIT360_WORKER_TOKEN_FILE <path>" on stdout, for scripts
SERVING_LINE = "DIT360_WORKER_SERVING"  # "DIT360_WORKER_SERVING 127.0.0.1:<port>" once it listens


def serve_args(parser: argparse.ArgumentParser) -> None:
    from .serve import DEFAULT_PORT

    group = parser.add_argument_group("serving on a GPU machine of its own")
    group.add_argument("--serve", action="store_true", help="keep serving clients (over an SSH tunnel)")
    group.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"loopback port (default {DEFAULT_PORT}; 0: any)"
    )
    group.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="write the token here, 0600 (default ~/.config/dit360_blender/worker.token)",
    )
    group.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="this machine's models folder (default: its Hugging Face cache)",
    )


def serve_main(args: argparse.Namespace) -> int:
    from .serve import ServeWorker, default_root, default_token_file, write_token

    root = private_dir(Path(args.log_dir).absolute() if args.log_dir else default_root())
    token = secrets.token_urlsafe(32)  # a new one each start: an old copy stops working
    token_file = write_token(args.token_file or default_token_file(), token)
    secrets_ = [token, *env_secrets()]
    log_path = setup_logging(root, secrets_)
    models_dir = args.models_dir.expanduser().absolute() if args.models_dir else None
    logger.info("serving worker starting (pid %d, python %s, folder %s)", os.getpid(), sys.executable, root)
    try:
        worker = ServeWorker(token, secrets_, root, models_dir, args.port)
        port = worker.listen()
    except OSError as exc:
        print(
            f"Could not listen on 127.0.0.1:{args.port}: {exc.strerror or exc}. Choose another --port.",
            file=sys.stderr,
        )
        return finish(3)
    worker.watch()
    print(f"{TOKEN_LINE} {token_file}", flush=True)
    print(f"Token (also in {token_file}, readable by you only): {token}", flush=True)
    print(
        f"On your computer: copy that file, then  ssh -N -L {port}:127.0.0.1:{port} <this host>  "
        f"(or let the add-on start the tunnel) and choose Worker: Remote in its preferences.",
        flush=True,
    )
    logging.getLogger().addHandler(ClientLogHandler(worker.send, secrets_))
    try:
        worker.start_jobs(log_path)
    except BaseException as exc:
        logger.exception("the worker could not load torch and the pipeline")
        worker.fail_start(exc)
        return finish(3)
    try:
        print(f"{SERVING_LINE} 127.0.0.1:{port}", flush=True)
        code = worker.run_jobs()
    except KeyboardInterrupt:
        logger.info("stopped (Ctrl-C)")
        code = 0
    except BaseException:
        logger.exception("the worker failed")
        code = 3
    return finish(code)
