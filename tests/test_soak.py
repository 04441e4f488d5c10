"""A soak on loopback: 8 gradio_client clients at once for a bounded time against the app
with tiny weights and a small queue, mixing synthesis under several presets with adding,
using and removing voices. Every request completes or is refused with "queue is full";
each answer is for the request that asked (its own voice and seed); the server's memory
and open files stop growing. Figures go to ``artifacts/soak.json`` (or
``$SOAK_ARTIFACTS``); docs/reliability.md quotes a run."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from app_server import ROOT, running_app
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError

CLIENTS = 8
SECONDS = float(os.environ.get("SOAK_SECONDS", "45"))
QUEUE_MAX = 6  # small, so that 8 clients do meet a full queue
PRESETS = ("cached", "cpu-fast", "fast-decoder")
CLIP = ROOT / "voices" / "bright-high.wav"
ARTIFACT = Path(os.environ.get("SOAK_ARTIFACTS", ROOT / "artifacts")) / "soak.json"


def process_figures(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines()
                  if line.startswith("VmRSS:"))
    return {"rss_mb": round(rss_kb / 1024, 1), "open_files": len(os.listdir(f"/proc/{pid}/fd"))}


def synth(client: Client, text: str, voice: str, preset: str, seed: int) -> dict:
    _, _, report, _ = client.predict(text, voice, preset, 0.5, 0.5, 0.8, 1.0, 0.05, 1.2, seed,
                                     10, False, api_name="/synthesize")
    return report


def remove_patiently(client: Client, voice: str) -> None:
    """Remove a voice this client added, waiting out full queues: a soak leaves nothing."""
    for _ in range(60):
        try:
            client.predict(voice, api_name="/remove_voice")
            return
        except (AppError, QueueError) as exc:
            if "queue is full" not in str(exc).lower():
                raise
            time.sleep(0.5)
    raise AssertionError(f"could not remove {voice!r}: the queue stayed full")


def worker(index: int, url: str, deadline: float, tally: dict, lock: threading.Lock) -> None:
    client = Client(url, verbose=False)
    round_ = 0
    while time.monotonic() < deadline:
        round_ += 1
        seed = index * 1000 + round_
        voice = f"soak {index} {round_}"
        try:
            if round_ % 3 == 0:  # add a voice, speak in it, remove it
                client.predict(handle_file(str(CLIP)), voice, 0.5, api_name="/add_voice")
                try:
                    report = synth(client, "My own voice.", voice, PRESETS[index % 3], seed)
                    assert report["voice"]["name"] == voice, report["voice"]
                finally:
                    remove_patiently(client, voice)
            else:
                report = synth(client, "Soak test.", "calm-mid", PRESETS[round_ % 3], seed)
                assert report["voice"]["name"] == "calm-mid"
            assert report["params"]["seed"] == seed, "an answer for another request"
            outcome = "ok"
        except (AppError, QueueError) as exc:
            if "queue is full" not in str(exc).lower():
                raise
            outcome = "queue_full"
            time.sleep(0.5)
        with lock:
            tally[outcome] += 1


def test_eight_clients_mixing_everything(tmp_path):
    with running_app(tmp_path, CHATTERBOX_QUEUE_MAX=str(QUEUE_MAX)) as (url, _, pid):
        warm = Client(url, verbose=False)
        for preset in PRESETS:  # build every variant first: growth after this is a leak
            synth(warm, "Warm up.", "calm-mid", preset, 1)
        start = process_figures(pid)
        tally, lock, errors = {"ok": 0, "queue_full": 0}, threading.Lock(), []
        deadline = time.monotonic() + SECONDS
        started = time.monotonic()

        def run(index):
            try:
                worker(index, url, deadline, tally, lock)
            except Exception as exc:  # collected, so that one failure names itself
                errors.append(f"client {index}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        time.sleep(SECONDS / 3)
        third = process_figures(pid)  # under full load: from here on nothing should grow
        for thread in threads:
            thread.join(SECONDS + 300)
        elapsed = time.monotonic() - started
        end = process_figures(pid)
        voices = [row[0] for row in warm.predict(api_name="/list_voices")]

    figures = {"clients": CLIENTS, "seconds": round(elapsed, 1), "queue_max": QUEUE_MAX,
               "requests_ok": tally["ok"], "queue_full": tally["queue_full"],
               "errors": errors, "start": start, "after_a_third": third, "end": end}
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures))
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads), "a client never finished"
    assert tally["ok"] >= CLIENTS
    assert not [name for name in voices if name.startswith("soak")], "a voice was left behind"
    # Memory settles once every request kind has run (allocator pools, Gradio's caches):
    # from a third of the way in to the end it may not grow by more than noise.
    assert end["rss_mb"] <= third["rss_mb"] * 1.05 + 50, figures
    assert end["open_files"] <= third["open_files"] + 2, figures
