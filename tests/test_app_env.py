"""app.py refuses a bad environment variable with one line naming it, before Gradio starts
or any model loads: exit status 2, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from app_server import ROOT, free_port

BAD_SETTINGS = [
    ("CHATTERBOX_WEIGHTS", "bogus", "Unknown weights source 'bogus'"),
    # It started the page, which then failed at its first use.
    ("CHATTERBOX_WEIGHTS", "local:/no/such/weights", "/no/such/weights does not exist"),
    ("CHATTERBOX_DEMO_CACHE", "/etc/passwd", "/etc/passwd is a file; name a folder"),
    ("CHATTERBOX_DEVICE", "gpu", "Unknown device 'gpu'"),
    pytest.param("CHATTERBOX_DEVICE", "cuda", "not available here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
    ("GRADIO_SERVER_PORT", "abc", "whole number"),
    ("GRADIO_SERVER_PORT", "99999", "between 1 and 65535"),  # was an OverflowError, then abort
    ("CHATTERBOX_QUEUE_MAX", "lots", "whole number"),
    ("CHATTERBOX_QUEUE_MAX", "0", "at least 1 (got 0)"),  # a queue of 0 refuses everyone
    ("CHATTERBOX_UPLOAD_TTL", "10m", "whole number"),
]


def run_app(tmp_path, name, value):
    env = {**os.environ, "CHATTERBOX_WEIGHTS": "tiny", "HF_HUB_OFFLINE": "1",
           "CHATTERBOX_DEMO_CACHE": str(tmp_path / "cache"),
           "GRADIO_ANALYTICS_ENABLED": "False", name: value}
    for other in ("CHATTERBOX_DEVICE", "CHATTERBOX_QUEUE_MAX", "CHATTERBOX_UPLOAD_TTL",
                  "GRADIO_SERVER_PORT"):
        if other != name:
            env.pop(other, None)
    # The timeout only matters if the app wrongly starts serving instead of exiting.
    return subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def assert_refused(done, name, message):
    assert "Traceback" not in done.stderr
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(f"error: {name}")
    assert message in done.stderr


@pytest.mark.parametrize(("name", "value", "message"), BAD_SETTINGS)
def test_a_bad_setting_is_one_line_naming_it(tmp_path, name, value, message):
    assert_refused(run_app(tmp_path, name, value), name, message)


def test_a_port_in_use_is_refused_not_swapped_for_the_next_one(tmp_path):
    # Gradio took the next free port, so whatever expected the app on this one found
    # nothing there, or another program.
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = run_app(tmp_path, "GRADIO_SERVER_PORT", str(port))
    assert_refused(done, "GRADIO_SERVER_PORT", f"port {port} is in use")
