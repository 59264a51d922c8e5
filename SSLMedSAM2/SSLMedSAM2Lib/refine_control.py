"""Starting, watching and stopping a `sslmedsam2 refine` job from the module, the same way on every platform.

No Slicer here. The job is the real interpreter (launch.py), or the engine command, in a session of its own, with
no window on Windows, so closing Slicer does not stop it. Whether it runs is whether it holds WS/refine/.lock
(os.kill(pid, 0) is no check on Windows); a stop is a request file the job watches at its safe points (SIGTERM is
a hard kill on Windows).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from SSLMedSAM2Lib.engine_output import EngineOutput
from SSLMedSAM2Lib.launch import background_options, engine_program, import_engine

LOG_TAIL_CHARS = 20000


class RefineControl:
    """One workspace's job: the process this control started (if any) and the job's own files."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = Path(workspace)
        self.refine_dir = self.workspace / "refine"
        self.log_path = self.workspace / "refine-job.log"
        self.process: subprocess.Popen | None = None
        self.stop_pending = False

    def start(self, arguments: list[str], command: str = "") -> None:
        """`sslmedsam2 refine ...` detached from Slicer, in Slicer's own Python or with `command` (another
        environment's sslmedsam2); its output goes to WS/refine-job.log."""
        program, program_arguments, environment = engine_program(arguments, command)
        with open(self.log_path, "a", encoding="utf-8") as log:
            self.process = subprocess.Popen([program, *program_arguments], stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=environment, **background_options())
        self.stop_pending = False

    def _started_here_and_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def running(self) -> bool:
        """The process started here is alive (a job takes seconds to start and lock), or a job holds the lock."""
        import_engine()
        from sslmedsam2.refine.events import job_running

        return self._started_here_and_alive() or job_running(self.refine_dir)

    def _job_ready(self) -> bool:
        """A job holds the lock and is past its start, where it drops stop requests left by a job that died."""
        import_engine()
        from sslmedsam2.refine.events import EventLog, job_running

        if not job_running(self.refine_dir):
            return False
        if not self._started_here_and_alive():
            return True  # a job started elsewhere (or before Slicer was reopened): it is running
        status = EventLog(self.refine_dir).read_status()
        return status.get("state") == "running" and status.get("pid") == self.process.pid

    def cancel(self) -> str:
        """Ask the job to stop at its next safe point; a job still starting is asked as soon as it runs.

        Returns what happened, in words ("" when no job runs).
        """
        from sslmedsam2.refine.events import request_stop

        if self._job_ready():
            request_stop(self.refine_dir)
            self.stop_pending = False
            return "asked the job to stop at its next safe point"
        if self._started_here_and_alive():
            self.stop_pending = True
            return "the job is starting; it will be asked to stop as soon as it runs"
        return ""

    def poll(self) -> None:
        """Deliver a pending stop request once the job runs (call it on the panel's timer)."""
        if self.stop_pending and self._job_ready():
            from sslmedsam2.refine.events import request_stop

            request_stop(self.refine_dir)
            self.stop_pending = False

    def failure(self) -> str | None:
        """Why the process started here ended badly (the engine's one-line error from its log), else None."""
        if self.process is None or self.process.poll() in (None, 0):
            return None
        output = EngineOutput()
        if self.log_path.is_file():
            output.feed(self.log_path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:] + "\n")
        return output.error or f"the job stopped with exit code {self.process.returncode}; see {self.log_path}"
