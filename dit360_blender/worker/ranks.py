"""Several GPUs (or CPU processes) for one worker: the rank group behind `device: "cuda:0,1,2,3"`.

The worker's own process is rank 0: it serves the socket, runs the job as with one device on the
first listed device, writes the files and sends every event. Ranks 1..N-1 are child processes
(multiprocessing *spawn*, on every platform), each holding the whole model on its device; they
join a torch.distributed group (NCCL on GPUs, gloo for `cpu:N`) and sample their slice of the
token sequence (pipeline/sequence_parallel.py). Rank 0 tells them each job over a pipe (JSON bytes,
no pickle), they answer `done` (with the steps they ran and their peak memory) or `failed`.

Rendezvous: a FileStore in a fresh 0700 temporary folder, not a TCP port: torch's TCPStore listens
on every interface (checked: `ss` shows `*:PORT` for TCPStore('127.0.0.1', ...)), and the worker
stays off the network. gloo's and NCCL's own sockets are bound to the loopback interface
(GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME). NVLink multicast is off in every rank (RANK_ENV).

A rank that dies (or fails) ends the job with `rank_failed` naming it and its exit code; the group
is torn down and marked broken, so the model cache loads a fresh group for the next job.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from datetime import timedelta
from multiprocessing import connection
from pathlib import Path

from ..pipeline.errors import DeviceError, DiT360Error

logger = logging.getLogger(__name__)

# NVLink SHARP multicast misbehaves on the lent hosts (see the device notes); off in every rank.
RANK_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
MULTI_DEVICE = re.compile(r"cuda:(\d{1,2}(?:,\d{1,2})+)|cpu:(\d{1,2})")
START_TIMEOUT_S = 180.0  # a rank process must import torch and join the group within this
LOAD_TIMEOUT_S = 3600.0  # and load its models (a cold 24 GB read) within this
DONE_TIMEOUT_S = 60.0  # after rank 0 finished a job, the others report within this
COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # one collective waiting on another rank
MAX_REPORT_BYTES = 1 << 20


class RankFailedError(DiT360Error):
    """A rank of a multi-GPU group died or failed during the job."""

    code = "rank_failed"


_HINT = (
    "The group of GPU processes was stopped; the next job starts it again. If it repeats, look in "
    "the worker log for that rank's error, or list fewer GPUs in the device setting."
)


def rank_devices(spec: str) -> list[str] | None:
    """The devices of a multi-device setting ("cuda:0,1" -> ["cuda:0", "cuda:1"]; "cpu:2" -> two
    CPU ranks), None for a one-device setting. Raises DeviceError for one that can't run here."""
    match = MULTI_DEVICE.fullmatch(spec)
    if match is None:
        return None
    if match.group(2) is not None:
        count = int(match.group(2))
        if count < 1:
            raise DeviceError(f"Device {spec!r} asks for no CPU processes.", "Use cpu:2 or more, or cpu.")
        return ["cpu"] * count
    indices = [int(i) for i in match.group(1).split(",")]
    if len(set(indices)) != len(indices):
        raise DeviceError(f"Device {spec!r} lists a GPU twice.", "List each GPU once, e.g. cuda:0,1,2,3.")
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [i for i in indices if i >= have]
    if missing:
        raise DeviceError(
            f"Device {spec!r} needs GPU {missing[0]}, but this PyTorch sees {have} CUDA GPU(s).",
            f"List GPUs 0 to {have - 1} only (nvidia-smi shows them), or choose one device.",
        )
    return [f"cuda:{i}" for i in indices]


def device_spec(device: str, gpus: str = "") -> str:
    """The device setting with the preferences' GPUs list folded in ("auto"/"cuda" + "0,1" ->
    "cuda:0,1"); an empty list leaves `device` as it is."""
    gpus = gpus.strip().replace(" ", "")
    if not gpus:
        return device
    if device not in ("auto", "cuda"):
        raise DeviceError(
            f"The GPUs setting ({gpus}) and the device {device!r} disagree.",
            "Clear the GPUs setting, or set the device to Auto or CUDA.",
        )
    return f"cuda:{gpus}"


def loopback_env() -> dict[str, str]:
    """Bind gloo's and NCCL's sockets to the loopback interface (its name differs per platform;
    Windows has no such setting, and its gloo group is local anyway)."""
    name = {"linux": "lo", "darwin": "lo0"}.get(sys.platform)
    return {} if name is None else {"GLOO_SOCKET_IFNAME": name, "NCCL_SOCKET_IFNAME": name}


def _send(conn, msg: dict) -> None:
    conn.send_bytes(json.dumps(msg).encode("utf-8"))


def _recv(conn) -> dict:
    return json.loads(conn.recv_bytes(MAX_REPORT_BYTES).decode("utf-8"))


def _backend(devices: list[str]) -> str:
    return "nccl" if devices[0].startswith("cuda") else "gloo"


class RankGroup:
    """Ranks 1..N-1 as child processes and this process as rank 0 of their group."""

    def __init__(self, devices: list[str], paths: dict, load_kwargs: dict, mode: str = "auto") -> None:
        self.devices = devices
        self.mode = mode  # the attention: auto (Ulysses where the heads divide, else ring), ulysses, ring
        self.world = len(devices)
        self.backend = _backend(devices)
        self.load = {
            "paths": {k: None if v is None else str(v) for k, v in paths.items()},
            "kwargs": load_kwargs,
            "mode": mode,
        }
        self.dir = Path(tempfile.mkdtemp(prefix="dit360-ranks-"))  # 0700: ours alone
        self.helpers: list = []  # (process, conn) of ranks 1..N-1
        self.sp = None
        self.closed = False
        self.last_reports: list[dict] = []
        self.in_job = threading.Event()  # set while rank 0 samples with the others

    # -- start -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the other ranks and join the group with them (they then load their models)."""
        import multiprocessing

        import torch
        import torch.distributed as dist

        from ..pipeline.sequence_parallel import SequenceParallel

        os.environ.update(RANK_ENV)  # inherited by the spawned ranks, read by NCCL in this one
        os.environ.update(loopback_env())
        if dist.is_initialized():  # a group left behind by a failed start
            dist.destroy_process_group()
        ctx = multiprocessing.get_context("spawn")
        _windowless(ctx)
        store = str(self.dir / "store")
        for rank in range(1, self.world):
            here, there = ctx.Pipe()
            args = (
                rank,
                self.world,
                self.backend,
                self.devices[rank],
                store,
                json.dumps(self.load),
                there,
                os.getpid(),
            )
            process = ctx.Process(target=rank_main, args=args, name=f"dit360-rank{rank}", daemon=True)
            process.start()
            there.close()
            self.helpers.append((process, here))
        for rank in range(1, self.world):
            started = self._expect(rank, "started", START_TIMEOUT_S)
            logger.info(
                "rank %d of %d started (pid %d) on %s", rank, self.world, started["pid"], self.devices[rank]
            )
        if self.backend == "nccl":
            torch.cuda.set_device(self.devices[0])
        dist.init_process_group(
            self.backend, store=dist.FileStore(store, self.world), rank=0, world_size=self.world,
            timeout=COLLECTIVE_TIMEOUT,
        )  # fmt: skip
        control = dist.new_group(backend="gloo") if self.backend != "gloo" else None
        self.sp = SequenceParallel(None, control, self.mode)
        logger.info("rank group of %d started on %s (%s)", self.world, ", ".join(self.devices), self.backend)
        if self.backend == "nccl" and self.helpers:
            threading.Thread(target=self._watch, name="rank-watch", daemon=True).start()

    def _watch(self) -> None:
        """NCCL: a collective (or the CUDA sync after it) waiting on a rank that died may never
        return, so a death during a job aborts the group's communicators, which makes the waiting
        call fail at once (gloo fails by itself: the dead rank's sockets close)."""
        sentinels = [process.sentinel for process, _conn in self.helpers]
        while not self.closed:
            if connection.wait(sentinels, timeout=0.5) and not self.closed and self.in_job.is_set():
                logger.error("a rank died during the job: aborting the group's collectives")
                _leave_group(abort=True)
                return

    def wait_ready(self) -> None:
        for rank in range(1, self.world):
            self._expect(rank, "ready", LOAD_TIMEOUT_S)

    # -- jobs ------------------------------------------------------------------------------------

    def dispatch(self, msg: dict) -> None:
        for rank, (_process, conn) in enumerate(self.helpers, start=1):
            try:
                _send(conn, msg)
            except OSError:
                raise self._failure(rank) from None

    def collect(self) -> list[dict]:
        """Every other rank's `done` report of the job just ended (rank order)."""
        reports = [self._expect(rank, "done", DONE_TIMEOUT_S) for rank in range(1, self.world)]
        for rank, report in enumerate(reports, start=1):
            logger.info("rank %d: %s after %d steps", rank, report["status"], report["steps"])
        self.last_reports = reports
        return reports

    def _expect(self, rank: int, kind: str, timeout: float) -> dict:
        """The next report of `rank`, which must be `kind`; RankFailedError if it failed or died."""
        process, conn = self.helpers[rank - 1]
        deadline = time.monotonic() + timeout
        while True:
            if conn.poll():
                try:
                    msg = _recv(conn)
                except (EOFError, OSError):
                    raise self._failure(rank) from None
                if msg.get("type") == kind:
                    return msg
                raise self._failure(rank, msg.get("message"))
            left = deadline - time.monotonic()
            if left <= 0:
                raise RankFailedError(
                    f"Rank {rank} ({self.devices[rank]}) did not answer within {timeout:.0f} s ({kind}).",
                    _HINT,
                )
            ready = connection.wait([conn, process.sentinel], timeout=min(left, 1.0))
            if process.sentinel in ready and not conn.poll():
                raise self._failure(rank)

    def failure_after(self, exc: BaseException) -> BaseException:
        """After a job raised `exc` on rank 0: the dead or failed rank's error when there is one
        (waiting a moment for its report), else `exc` itself. The group is torn down either way."""
        deadline = time.monotonic() + 3.0
        found = None
        while found is None and time.monotonic() < deadline:
            for rank, (process, conn) in enumerate(self.helpers, start=1):
                if conn.poll() or not process.is_alive():
                    try:
                        msg = _recv(conn) if conn.poll() else {}
                    except (EOFError, OSError):
                        msg = {}
                    if msg.get("type") in ("done", "ready", "started"):
                        continue
                    found = self._failure(rank, msg.get("message"))
                    break
            else:
                time.sleep(0.05)
        self.close(force=True)
        return found if found is not None else exc

    def _failure(self, rank: int, reason: str | None = None) -> RankFailedError:
        process, _conn = self.helpers[rank - 1]
        process.join(timeout=2.0)
        code = process.exitcode
        how = "is still running" if code is None else f"exited with code {code}"
        if code is not None and code < 0:
            how = f"was killed (signal {-code})"
        text = f"Rank {rank} of {self.world} ({self.devices[rank]}, pid {process.pid}) {how}"
        return RankFailedError(text + (f": {reason}" if reason else "."), _HINT)

    # -- stop ------------------------------------------------------------------------------------

    def close(self, force: bool = False) -> None:
        """Stop the other ranks (asked to; killed if `force` or they don't go) and leave the group."""
        if self.closed:
            return
        self.closed = True
        for process, conn in self.helpers:
            if not force and process.is_alive():
                try:
                    _send(conn, {"type": "stop"})
                except OSError:
                    pass
        for process, conn in self.helpers:
            process.join(timeout=0.1 if force else 10.0)
            if process.is_alive():
                process.kill()
                process.join(timeout=5.0)
            conn.close()
        _leave_group(abort=force)
        shutil.rmtree(self.dir, ignore_errors=True)
        logger.info("rank group stopped")


def _windowless(ctx) -> None:
    """On Windows the worker runs without a console (CREATE_NO_WINDOW), and python.exe started from
    it would open a console window per rank; pythonw.exe, beside it, opens none."""
    if sys.platform != "win32":
        return
    pythonw = Path(sys.executable).with_name("pythonw.exe")
    if pythonw.is_file():
        ctx.set_executable(str(pythonw))


def _leave_group(abort: bool) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        if abort and dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()  # a collective may be stuck on a dead rank
        else:
            dist.destroy_process_group()
    except Exception:  # leaving a broken group must not hide the job's own error
        logger.warning("leaving the rank group failed", exc_info=True)


# ---------------------------------------------------------------------------------------------
# The pipeline rank 0 runs


def parallel_pipeline_class():
    """ParallelPipeline (defined on first use: it subclasses the torch-importing DiT360Pipeline)."""
    global _PARALLEL
    if _PARALLEL is None:
        _PARALLEL = _define_parallel_pipeline()
    return _PARALLEL


_PARALLEL = None


def _define_parallel_pipeline():
    from ..pipeline.dit360 import Cancelled, DiT360Pipeline
    from ..pipeline.sequence_parallel import generate_sharded

    class ParallelPipeline(DiT360Pipeline):
        """A DiT360Pipeline on the first device whose `generate` samples over the whole group.
        Other uses of its parts (an edit's own loops) run on the first device alone."""

        group: RankGroup | None = None
        broken = False

        @classmethod
        def load(
            cls, paths, device: str | list[str] = "cpu:2", sequence_parallel: str = "auto", **kwargs
        ) -> ParallelPipeline:
            """`device`: a multi-device setting or a list of devices (one is allowed: a one-rank
            group); `sequence_parallel` forces the attention mode (the bench's checks)."""
            devices = device if isinstance(device, list) else rank_devices(device)
            if not devices:
                raise DeviceError(f"Device {device!r} is one device.", "Use the one-device pipeline.")
            group = RankGroup(devices, paths.as_dict(), kwargs, sequence_parallel)
            try:
                group.start()
                pipe = super().load(paths, device=devices[0], **kwargs)
                group.wait_ready()
            except BaseException:
                group.close(force=True)
                raise
            pipe.group = group
            mode = group.sp.describe(pipe.transformer.num_heads)
            pipe.model_info.update(device=devices[0].split(":")[0], devices=devices, sequence_parallel=mode)
            return pipe

        def generate(self, request, on_step=None, should_cancel=None, on_stage=None, latents=None):
            if self.broken or self.group is None:
                raise RankFailedError("The rank group of this model was stopped.", _HINT)
            step_latents = on_step is not None
            self.group.dispatch(
                {"type": "generate", "request": asdict(request), "step_latents": step_latents}
            )
            self.group.in_job.set()
            try:
                generation = generate_sharded(
                    self, request, self.group.sp, on_step=on_step, should_cancel=should_cancel,
                    on_stage=on_stage, latents=latents, step_latents=step_latents,
                )  # fmt: skip
            except Cancelled:
                self._collect()  # every rank stopped before the same step
                raise
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                self.broken = True
                raise self.group.failure_after(exc) from exc
            finally:
                self.group.in_job.clear()
            reports = self._collect()
            generation.metadata["rank_peak_bytes"] = [r.get("peak_bytes") for r in reports]
            return generation

        def _collect(self) -> list[dict]:
            try:
                return self.group.collect()
            except RankFailedError:
                self.broken = True
                self.group.close(force=True)
                raise

        def close(self) -> None:
            if self.group is not None:
                self.group.close(force=self.broken)

    return ParallelPipeline


# ---------------------------------------------------------------------------------------------
# Ranks 1..N-1


def rank_main(
    rank: int, world: int, backend: str, device: str, store: str, load: str, conn, parent_pid: int
) -> None:
    """A spawned rank: join the group, load the models, sample each job rank 0 sends, until `stop`,
    the pipe's end or rank 0's death. Any failure is reported on the pipe, then the process exits."""
    os.environ.update(RANK_ENV)
    os.environ.update(loopback_env())
    _watch_parent(parent_pid)
    try:
        _send(conn, {"type": "started", "pid": os.getpid()})
        pipe, sp, steps = _join_and_load(rank, world, backend, device, store, json.loads(load))
        _send(conn, {"type": "ready"})
        _serve_jobs(conn, pipe, sp, steps)
    except BaseException as exc:  # reported, then gone: rank 0 ends the job and the group
        try:
            _send(conn, {"type": "failed", "message": f"{type(exc).__name__}: {exc}"[:2000]})
        except OSError:
            pass
        os._exit(1)
    os._exit(0)  # skip teardown: CUDA/NCCL finalisers of a left group can hang


def _watch_parent(parent_pid: int) -> None:
    from .parent import parent_watch

    alive = parent_watch(parent_pid)

    def loop() -> None:
        while alive():
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def _join_and_load(rank: int, world: int, backend: str, device: str, store: str, load: dict):
    import torch
    import torch.distributed as dist

    from ..pipeline.dit360 import DiT360Pipeline
    from ..pipeline.model_files.catalogue import ModelPaths
    from ..pipeline.sequence_parallel import SequenceParallel

    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, store=dist.FileStore(store, world), rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    control = dist.new_group(backend="gloo") if backend != "gloo" else None
    sp = SequenceParallel(None, control, load.get("mode", "auto"))
    paths = ModelPaths(**{k: None if v is None else Path(v) for k, v in load["paths"].items()})
    kwargs = dict(load["kwargs"])
    kwargs["loras"] = [tuple(item) for item in kwargs.get("loras", ())]
    pipe = DiT360Pipeline.load(paths, device=device, **kwargs)
    pipe.text_encoders = None  # rank 0 encodes the prompt and sends the result
    steps = [0]
    pipe.transformer.register_forward_pre_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    return pipe, sp, steps


def _serve_jobs(conn, pipe, sp, steps: list[int]) -> None:
    import torch

    from ..pipeline.dit360 import Cancelled, GenerateRequest
    from ..pipeline.sequence_parallel import generate_sharded

    cuda = pipe.device.type == "cuda"
    while True:
        try:
            msg = _recv(conn)
        except (EOFError, OSError):
            return  # rank 0 is gone
        if msg["type"] == "stop":
            return
        request = GenerateRequest(**msg["request"])
        steps[0] = 0
        if cuda:
            torch.cuda.reset_peak_memory_stats(pipe.device)
        status = "finished"
        try:
            generate_sharded(pipe, request, sp, step_latents=bool(msg["step_latents"]))
        except Cancelled:
            status = "cancelled"
        peak = torch.cuda.max_memory_allocated(pipe.device) if cuda else None
        _send(conn, {"type": "done", "status": status, "steps": steps[0], "peak_bytes": peak})
