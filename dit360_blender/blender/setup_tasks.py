"""The set-up work the preferences start, each in a child process of its own (tasks.py): check the
worker's Python (`vendor_setup.py --check`), install its packages (`vendor_setup.py --target`),
look for the model files and download them (`worker/download.py`). Their messages (the
protocol's child messages) and, for pip, their text lines become the WindowManager's dependency
and model state; one task of each name at a time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import bpy

from ..launch import PACKAGE_DIR, worker_env
from .common import runtime, short, user_dir, vendor_setup_script
from .errors import GenerationError
from .link import COMPONENTS, WorkerLink
from .tasks import BackgroundTask

MAX_ITEMS_PER_TICK = 200  # bounded work per tick; the rest waits in the task's queue


class SetupTasks:
    def __init__(self, link: WorkerLink, wake: Callable[[], None]) -> None:
        self.tasks: dict[str, BackgroundTask] = {}
        self._link = link
        self._wake = wake  # starts the timer pump that drains the tasks
        # name -> (one item of its output: a child message or a text line, its exit once all is handled)
        self._handlers = {
            "install": (self._install_item, self._install_exit),
            "deps_check": (_ignore, self._deps_exit),  # its one `deps` message is read at the exit
            "models_check": (self._models_item, self._models_exit),
            "download": (self._download_item, self._download_exit),
        }

    def running(self, name: str) -> bool:
        return name in self.tasks

    @property
    def active(self) -> bool:
        return bool(self.tasks)

    def _start(
        self, name: str, cmd: list[str], env: dict | None = None, secrets: tuple = ()
    ) -> BackgroundTask:
        old = self.tasks.pop(name, None)
        if old is not None:
            old.cancel()
        logs = user_dir("logs")
        task = BackgroundTask(name, cmd, logs / f"{name}.log", env=env, cwd=logs, secrets=secrets)
        self.tasks[name] = task
        self._wake()
        return task

    def cancel(self, name: str) -> None:
        task = self.tasks.get(name)
        if task is not None:
            task.cancel()

    def pump(self) -> bool:
        """Handle what the tasks wrote (a bounded amount); True when something changed."""
        changed = False
        for name, task in list(self.tasks.items()):
            on_item, on_exit = self._handlers[name]
            items = task.take(MAX_ITEMS_PER_TICK)
            for item in items:
                on_item(task, item)
            changed |= bool(items)
            if task.done:
                self.tasks.pop(name, None)
                on_exit(task, task.returncode)
                changed = True
            elif name == "install":
                state = runtime()
                if state is not None:
                    state.install_elapsed = task.elapsed
        return changed

    def shutdown(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()

    # -- dependencies ----------------------------------------------------------------------------

    def start_deps_check(self) -> None:
        script = vendor_setup_script()
        state = runtime()
        if script is None:
            if state is not None:
                state.deps_state, state.deps_summary = "FAILED", "vendor_setup.py is missing from the add-on."
            return
        python, vendor = self._link.worker_python()
        cmd = [python, str(script), "--check", "--json"]
        if vendor is not None and vendor.is_dir() and any(vendor.iterdir()):
            cmd += ["--target", str(vendor)]
        try:
            self._start("deps_check", cmd)
        except OSError as exc:
            if state is not None:
                state.deps_state = "MISSING"
                state.deps_summary = f"Cannot run {python}: {exc.strerror or exc}"
            return
        if state is not None:
            state.deps_state, state.deps_summary, state.deps_detail = "CHECKING", "Checking…", ""

    def start_install(self, packages: str = "") -> None:
        """vendor_setup.py --target <vendor> with Blender's own Python, in the background."""
        script = vendor_setup_script()
        if script is None:
            raise GenerationError(
                "internal", "vendor_setup.py is missing from the add-on.", "Reinstall the add-on."
            )
        self._link.release()  # the worker's files are about to be replaced
        vendor = user_dir("vendor")
        cmd = [sys.executable, str(script), "--target", str(vendor)]
        if packages:
            cmd += ["--packages", packages]
        task = self._start("install", cmd, env=None)
        state = runtime()
        if state is not None:
            state.deps_state = "INSTALLING"
            state.install_status = "Starting pip…"
            state.install_log = str(task.log_path)
            state.install_elapsed = 0.0

    def _install_item(self, task: BackgroundTask, item: str | dict) -> None:
        state = runtime()
        if state is not None and isinstance(item, str) and item.strip():
            state.install_status = short(item)

    def _install_exit(self, task: BackgroundTask, code: int | None) -> None:
        state = runtime()
        if state is None:
            return
        if code == 0:
            state.install_status = f"Installed in {task.elapsed:.0f} s."
            self.start_deps_check()
        else:
            errors = [t for t in task.tail if "error" in t.lower()]
            state.deps_state = "FAILED"
            state.install_status = short(
                errors[-1] if errors else (task.tail[-1] if task.tail else f"exit {code}")
            )

    def _deps_exit(self, task: BackgroundTask, code: int | None) -> None:
        state = runtime()
        if state is None:
            return
        report = task.last.get("deps")
        if report is None:
            state.deps_state = "MISSING"
            tail = [t for t in task.tail if t.strip()]
            state.deps_summary = short(
                f"The worker's Python did not run the check: {tail[-1] if tail else code}"
            )
            return
        torch = report["packages"].get("torch", {})
        where = report.get("device_name") or report.get("device") or "?"
        if report.get("ok"):
            # ok with packages that did not import: those only one feature needs (vendor_setup.py's
            # FEATURE_PACKAGES), e.g. the upscale's spandrel; say so, generating still works.
            optional = [
                d for d, e in report["packages"].items() if e.get("error") and d not in report["missing"]
            ]
            state.deps_state = "OK"
            state.deps_summary = (
                f"torch {torch.get('version')} · {where} · Python {report.get('python_version')}"
                + (f" · upscale needs {', '.join(optional)} (Install Packages)" if optional else "")
            )
            state.deps_detail = short(
                "; ".join(f"{d}: {report['packages'][d]['error']}" for d in optional), 400
            )
        else:
            state.deps_state = "MISSING"
            state.deps_summary = f"Missing: {', '.join(report.get('missing', []))}"
            state.deps_detail = short(
                "; ".join(f"{d}: {e['error']}" for d, e in report["packages"].items() if e.get("error")), 400
            )

    # -- models ----------------------------------------------------------------------------------

    def _download_cmd(self, check: bool) -> tuple[list[str], dict]:
        python, vendor = self._link.worker_python()
        cmd = [python, "-s", "-m", f"{PACKAGE_DIR.name}.worker.download"] + (["--check"] if check else [])
        models_dir, paths = self._link.model_settings()
        cmd += ["--models-dir", models_dir] if models_dir else []
        for component, path in paths.items():
            cmd += ["--path", f"{component}={path}"]
        extra = {"HF_HUB_OFFLINE": "1"} if check else {}
        return cmd, worker_env(vendor, self._link.hf_token() or None, extra)

    def start_models_check(self) -> None:
        cmd, env = self._download_cmd(check=True)
        state = runtime()
        try:
            self._start("models_check", cmd, env=env)
        except OSError as exc:
            if state is not None:
                state.models_state = "FAILED"
                state.models_summary = f"Cannot run {cmd[0]}: {exc.strerror or exc}"
            return
        if state is not None:
            state.models_state, state.models_summary = "CHECKING", "Checking…"

    def start_download(self) -> bool:
        """Download the missing model files; False (and the reason in the state) when not allowed."""
        state = runtime()
        if not bpy.app.online_access:
            if state is not None:
                state.download_code = "offline"
                state.download_error = "Blender is set to work offline, so nothing is downloaded."
                state.download_hint = (
                    "Allow online access in Preferences ▸ System ▸ Network, or copy the model files "
                    "into a models folder by hand (see the add-on's README)."
                )
            return False
        cmd, env = self._download_cmd(check=False)
        token = self._link.hf_token()
        task = self._start("download", cmd, env=env, secrets=(token,) if token else ())
        if state is not None:
            state.models_state = "DOWNLOADING"
            state.download_status = "Looking for the files…"
            state.download_code = state.download_error = state.download_hint = ""
            state.download_files.clear()
            state.download_log = str(task.log_path)
        return True

    def _found(self, components: dict) -> None:
        state = runtime()
        if state is None:
            return
        missing = [c for c in COMPONENTS if not components.get(c)]
        state.models_missing = ", ".join(missing)
        if missing:
            state.models_state = "MISSING"
            state.models_summary = f"Missing: {', '.join(missing)}"
        else:
            state.models_state = "OK"
            state.models_summary = "All model files found."

    def _models_item(self, task: BackgroundTask, item: str | dict) -> None:
        kind = item.get("type") if isinstance(item, dict) else None
        state = runtime()
        if kind == "found":
            self._found(item["components"])
        elif kind == "error" and state is not None:
            state.models_state, state.models_summary = "FAILED", short(item["message"])

    def _models_exit(self, task: BackgroundTask, code: int | None) -> None:
        state = runtime()
        if "found" not in task.last and state is not None and state.models_state == "CHECKING":
            tail = [t for t in task.tail if t.strip()]
            state.models_state = "FAILED"
            state.models_summary = short(
                "Could not check (install the dependencies first): " + (tail[-1] if tail else f"exit {code}")
            )

    def _download_item(self, task: BackgroundTask, item: str | dict) -> None:
        state = runtime()
        if state is None or not isinstance(item, dict):
            return  # text (huggingface_hub's output, a traceback) is only logged
        kind = item["type"]
        if kind == "found":
            missing = [c for c in COMPONENTS if not item["components"].get(c)]
            state.download_status = (
                f"Downloading: {', '.join(missing)}" if missing else "All files are already there."
            )
        elif kind == "download_progress":
            entry = next((f for f in state.download_files if f.name == item["file"]), None)
            if entry is None:
                entry = state.download_files.add()
                entry.name = item["file"]
            entry.done, entry.total = float(item["done"]), float(item["total"])
            entry.progress = min(1.0, entry.done / entry.total) if entry.total else 0.0
            state.download_status = f"Downloading {item['file']}"
        elif kind == "downloaded":
            self._found(item["components"])
            state.download_status = "Download complete: all model files are there."
        elif kind == "error":
            state.models_state = "FAILED"
            state.download_code = item["code"]
            state.download_error = item["message"]
            state.download_hint = item["hint"]
            state.download_status = "Download failed."

    def _download_exit(self, task: BackgroundTask, code: int | None) -> None:
        state = runtime()
        if state is not None and code != 0 and state.models_state == "DOWNLOADING":
            state.models_state = "FAILED"
            state.download_status = (
                "Download stopped." if code in (-15, 1) else f"Download failed (exit {code})."
            )


def _ignore(task: BackgroundTask, item: str | dict) -> None:
    """For a task whose output matters only once it has exited."""
