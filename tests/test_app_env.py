"""app.py refuses a bad environment variable with one line naming it, before Gradio starts
or any model loads: exit status 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from app_server import ROOT

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


@pytest.mark.parametrize(("name", "value", "message"), BAD_SETTINGS)
def test_a_bad_setting_is_one_line_naming_it(tmp_path, name, value, message):
    env = {**os.environ, "CHATTERBOX_WEIGHTS": "tiny", "HF_HUB_OFFLINE": "1",
           "CHATTERBOX_DEMO_CACHE": str(tmp_path / "cache"),
           "GRADIO_ANALYTICS_ENABLED": "False", name: value}
    for other in ("CHATTERBOX_DEVICE", "CHATTERBOX_QUEUE_MAX", "CHATTERBOX_UPLOAD_TTL",
                  "GRADIO_SERVER_PORT"):
        if other != name:
            env.pop(other, None)
    # The timeout only matters if the app wrongly starts serving instead of exiting.
    done = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert "Traceback" not in done.stderr
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(f"error: {name}")
    assert message in done.stderr
