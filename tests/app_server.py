"""Start ``app.py`` as a real server on a free loopback port, with tiny weights, for the
HTTP and browser tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(workdir: Path, **extra_env: str):
    """Yield (url, port, pid) of ``app.py`` serving tiny weights, its cache under
    ``workdir``; fail with the app's log if it exits or does not answer."""
    port = free_port()
    log_path = workdir / "app.log"
    env = {**os.environ, "CHATTERBOX_WEIGHTS": "tiny",
           "CHATTERBOX_DEMO_CACHE": str(workdir / "cache"), "GRADIO_SERVER_PORT": str(port),
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(workdir / "gradio-tmp"), **extra_env}
    env.pop("GRADIO_SERVER_NAME", None)  # the default bind is what README promises
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"app.py did not answer in {START_TIMEOUT_S} s:\n"
                                f"{log_path.read_text()}")
                time.sleep(0.5)
        try:
            yield url, port, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
