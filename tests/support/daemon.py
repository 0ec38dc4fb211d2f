"""Run `ct-triage` commands as real processes (for crash, restart and broker tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.scanner import ECHOSCU, dcmtk_env


class Daemon:
    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.args = args
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> Daemon:
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen([sys.executable, "-m", "ct_triage_app.cli", *self.args], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_dicom_ready(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"ct-triage exited early:\n{self.log()}")
            result = subprocess.run([ECHOSCU, "-aet", "SCANNER", "-aec", "CTTRIAGE", "127.0.0.1", str(port)],
                                    capture_output=True, env=dcmtk_env())
            if result.returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"ct-triage did not answer C-ECHO on {port}:\n{self.log()}")

    def kill9(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        return self.process.returncode if self.process else 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
