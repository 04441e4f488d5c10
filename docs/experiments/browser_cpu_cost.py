"""The experiment behind docs/benchmarks.md's "A browser on the same machine": what a page
open in a browser on the app's own machine costs the generation it is waiting for.

Against a running app (``python app.py``), it takes turns between one synthesis clicked in
headless chromium (Debian's, through Playwright) and the same synthesis through
``gradio_client`` with no page open: same text, voice, preset, settings and seed, Stream
off. For each it prints the end-to-end seconds the app reports and, for the browser runs,
how many cores chromium and the server used while it ran. Run from the repository root:

    python docs/experiments/browser_cpu_cost.py http://127.0.0.1:7860/ 3
"""

from __future__ import annotations

import glob
import os
import sys
import time

from gradio_client import Client
from playwright.sync_api import sync_playwright

TEXT = "Hello there, this is a test of my voice."
VOICE, PRESET = "bright-high", "cpu-fast"


def cpu_seconds(name: str) -> float:
    """User plus system CPU seconds of every process whose command line mentions ``name``."""
    ticks = 0
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{proc}/cmdline", "rb") as f:
                if name.encode() not in f.read():
                    continue
            with open(f"{proc}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except OSError:  # gone meanwhile
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def in_browser(page) -> tuple[float, float, float]:
    """Click Synthesize once; (total s from the timing table, chromium cores, server cores)."""
    before, started = (cpu_seconds("chromium"), cpu_seconds("app.py")), time.time()
    page.get_by_role("button", name="Synthesize").click()
    time.sleep(3)
    page.wait_for_function(
        "() => { const t = document.body.innerText;"
        " return t.includes('RTF') && !t.includes('processing'); }",
        timeout=900_000, polling=1000)
    wall = time.time() - started
    body = page.locator("body").inner_text()
    total = float(body.split("total\t", 1)[1].split(" s", 1)[0])
    return (total, (cpu_seconds("chromium") - before[0]) / wall,
            (cpu_seconds("app.py") - before[1]) / wall)


def without_browser(url: str) -> float:
    _, _, report, _ = Client(url, verbose=False).predict(
        TEXT, VOICE, PRESET, 0.5, 0.5, 0.8, 1.0, 0.05, 1.2, 0, 0, False,
        api_name="/synthesize")
    return report["timings"]["total_s"]


def main(url: str, rounds: int) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox"])
        for round_ in range(1, rounds + 1):
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_function(
                "() => (document.querySelector('#status-line') || {}).innerText"
                "?.includes('weights')", timeout=900_000)
            page.get_by_role("tab", name="Synthesize").click()
            page.get_by_label("Text", exact=True).first.fill(TEXT)
            voice = page.get_by_label("Voice", exact=True).first
            voice.click()
            voice.fill(VOICE)
            page.keyboard.press("Enter")
            if page.get_by_label("Stream", exact=True).is_checked():
                page.get_by_label("Stream", exact=True).click()
            total, chromium, server = in_browser(page)
            print(f"round {round_}, page open: total {total:.1f} s; chromium used "
                  f"{chromium:.2f} cores, the server {server:.2f}", flush=True)
            page.close()
            print(f"round {round_}, no page: total {without_browser(url):.1f} s", flush=True)
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
