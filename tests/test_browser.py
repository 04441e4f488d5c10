"""The app in a real browser: Debian's headless chromium driven by Playwright, against
``app.py`` on a free port with tiny weights. Screenshots go to ``artifacts/browser/`` (or
``$BROWSER_ARTIFACTS``). A browser that cannot start fails the test with the reason."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from app_server import ROOT, running_app
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("BROWSER_ARTIFACTS", ROOT / "artifacts" / "browser"))
CLIP = ROOT / "voices" / "narrator-low.wav"
GENERATION_TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("browser")) as url_and_port:
        yield url_and_port[0]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`.ci/run` does)")
    with sync_playwright() as playwright:
        try:
            # Root (as in CI containers) cannot use chromium's sandbox.
            browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                                 args=["--no-sandbox"])
        except PlaywrightError as exc:
            pytest.fail(f"chromium did not start: {exc}")
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900},
                                  accept_downloads=True)
    page = context.new_page()
    page.goto(server)
    expect(page.locator("#status-line")).to_contain_text("tiny", timeout=60_000)
    yield page
    context.close()


def shoot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_upload_a_voice_synthesize_and_compare(page):
    # Voices: upload a clip under a new name.
    page.get_by_role("tab", name="Voices").click()
    page.locator("input[type=file]").first.set_input_files(str(CLIP))
    page.get_by_label("Name", exact=True).fill("browser voice")
    page.get_by_role("button", name="Add voice").click()
    expect(page.get_by_text("Added voice")).to_be_visible(timeout=GENERATION_TIMEOUT_MS)
    expect(page.get_by_text("browser voice").first).to_be_visible()
    shoot(page, "1-voices")

    # Synthesize in the new voice, which the pickers now show.
    page.get_by_role("tab", name="Synthesize").click()
    expect(page.get_by_label("Voice", exact=True).first).to_have_value("browser voice")
    page.get_by_role("button", name="Synthesize", exact=True).click()
    audio = page.locator("audio[src*='audio.wav']")
    expect(audio).to_have_count(1, timeout=GENERATION_TIMEOUT_MS)
    expect(page.get_by_text("voice from")).to_be_visible()
    shoot(page, "2-synthesize")

    # A/B: baseline against cpu-fast with B's CFM at 4 steps, set in B's advanced panel.
    page.get_by_role("tab", name="A/B Compare").click()
    page.get_by_text("B: advanced (every switch)").click()
    steps = page.get_by_label("cfm_steps: CFM steps (upstream 10)", exact=False)
    steps.last.fill("4")
    steps.last.press("Enter")
    expect(page.get_by_text("✓ cpu-fast+cfm_steps=4 runs on CPU")).to_be_visible()
    page.get_by_role("button", name="Run A then B").click()
    summary = page.locator("#ab-summary")
    expect(summary).to_contain_text("end to end", timeout=GENERATION_TIMEOUT_MS)
    expect(summary).to_contain_text("Fidelity of B against A")
    expect(page.locator("#audio-a audio[src], #audio-b audio[src]")).to_have_count(2)
    expect(page.locator("#ab-table")).to_contain_text(re.compile(r"total \(s\)"))
    expect(page.locator("#ab-chart img")).to_have_count(1)
    expect(page.locator("#ab-mels img")).to_have_count(1)
    expect(page.locator("#ab-history")).to_contain_text("cpu-fast+cfm_steps=4")
    with page.expect_download() as download:
        page.locator("#ab-history-csv").click()
    assert download.value.suggested_filename.endswith(".csv")
    shoot(page, "3-compare-1280")

    # A phone-width window: nothing wider than the screen.
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(500)
    width, viewport = page.evaluate("[document.documentElement.scrollWidth, innerWidth]")
    assert width <= viewport
    shoot(page, "4-compare-phone")


def add_voice_and_pick_it_as_mine(page, name: str) -> None:
    """Add the clip as ``name`` on the Voices tab and pick it under "Your voices"."""
    page.get_by_role("tab", name="Voices").click()
    page.locator("input[type=file]").first.set_input_files(str(CLIP))
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_role("button", name="Add voice").click()
    expect(page.get_by_text("Added voice")).to_be_visible(timeout=GENERATION_TIMEOUT_MS)
    mine = page.get_by_label("Your voices", exact=False)
    mine.click()
    mine.fill(name)
    page.keyboard.press("Enter")


def test_renaming_the_picked_voice_keeps_it_picked(page):
    """The pickers used to fall back to the first voice when the one they showed was
    renamed: the next synthesis spoke in another voice without a word."""
    add_voice_and_pick_it_as_mine(page, "to rename")
    page.get_by_label("New name", exact=True).fill("renamed")
    page.get_by_role("button", name="Rename", exact=True).click()
    expect(page.get_by_text("Renamed to")).to_be_visible(timeout=GENERATION_TIMEOUT_MS)
    page.get_by_role("tab", name="Synthesize").click()
    expect(page.get_by_label("Voice", exact=True).first).to_have_value("renamed")
    page.get_by_role("tab", name="A/B Compare").click()
    expect(page.get_by_label("Voice", exact=True).last).to_have_value("renamed")


def test_a_second_rename_renames_the_same_voice(page):
    """After a rename "Your voices" jumped to the first user voice, so a second Rename (to
    mend a typo) renamed another voice."""
    add_voice_and_pick_it_as_mine(page, "first mine")
    add_voice_and_pick_it_as_mine(page, "typo mine")
    for name in ("tpyo mine", "fixed mine"):
        page.get_by_label("New name", exact=True).fill(name)
        page.get_by_role("button", name="Rename", exact=True).click()
        expect(page.get_by_text(f"Renamed to {name}")).to_be_visible(
            timeout=GENERATION_TIMEOUT_MS)
        expect(page.get_by_label("Your voices", exact=False)).to_have_value(name)
    library = page.locator("#voice-table")
    expect(library).to_contain_text("first mine")
    expect(library).not_to_contain_text("tpyo mine")
    # A failed add says why in a notice; the library stays in view.
    page.locator("input[type=file]").first.set_input_files(str(CLIP))
    page.get_by_label("Name", exact=True).fill("first mine")
    page.get_by_role("button", name="Add voice").click()
    expect(page.get_by_text("exists", exact=False).first).to_be_visible(
        timeout=GENERATION_TIMEOUT_MS)
    expect(library).to_contain_text("fixed mine")


def test_removing_the_voice_in_use_says_what_synthesize_uses_now(page):
    add_voice_and_pick_it_as_mine(page, "used then removed")
    page.get_by_role("tab", name="Synthesize").click()
    expect(page.get_by_label("Voice", exact=True).first).to_have_value("used then removed")
    page.get_by_role("tab", name="Voices").click()
    page.get_by_role("button", name="Remove", exact=True).click()
    page.get_by_role("button", name="Yes, remove it").click()
    expect(page.get_by_text("Synthesize now uses")).to_be_visible(
        timeout=GENERATION_TIMEOUT_MS)


def test_remove_asks_first_and_keep_keeps_the_voice(page):
    """Remove deleted a voice at one click; now it asks, naming the voice."""
    add_voice_and_pick_it_as_mine(page, "to remove")
    question, answers = page.locator("#removal-question"), page.locator("#confirm-removal")
    library = page.locator("#voice-table")
    page.get_by_role("button", name="Remove", exact=True).click()
    expect(question).to_contain_text("Remove to remove from the library?")
    expect(answers).to_be_visible()
    # The first question on a page stayed under a "processing" timer that never stopped.
    expect(page.locator("#voices-tab")).not_to_contain_text("processing", timeout=10_000)
    page.get_by_role("button", name="Keep it").click()
    expect(answers).to_be_hidden()
    expect(question).not_to_contain_text("Remove")
    expect(library).to_contain_text("to remove")

    page.get_by_role("button", name="Remove", exact=True).click()
    page.get_by_role("button", name="Yes, remove it").click()
    expect(page.get_by_text("Removed voice")).to_be_visible(timeout=GENERATION_TIMEOUT_MS)
    expect(answers).to_be_hidden()
    expect(question).not_to_contain_text("Remove")
    expect(library).not_to_contain_text("to remove")


def test_synthesize_without_streaming_shows_the_result(page):
    """With Stream unticked (always so without ffmpeg), the result reaches the Result
    player: the page loads its audio file and shows its length."""
    page.get_by_role("tab", name="Synthesize").click()
    page.get_by_role("textbox").first.fill("Hello there, a short test.")
    page.get_by_label("Stream").uncheck()
    with page.expect_response(lambda r: "audio.wav" in r.url and r.ok,
                              timeout=GENERATION_TIMEOUT_MS):
        page.get_by_role("button", name="Synthesize", exact=True).click()
    expect(page.get_by_text("voice from")).to_be_visible()
    expect(page.get_by_text("Error", exact=True)).to_have_count(0)
    shoot(page, "8-synthesize-no-stream")


def test_runs_one_after_another_each_play_live_without_polling(page):
    """In one page: unstreamed, then streamed twice. Gradio 6.8's live player attached
    only a page's first stream (later runs were silent), and an unstreamed run left an
    empty stream that the page then polled hundreds of times a second (a streamed run
    after it took minutes instead of seconds on 2 cores)."""
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.get_by_role("tab", name="Synthesize").click()
    live = page.locator("#live-audio audio")
    sources = []
    for run, streamed in enumerate((False, True, True)):
        # Texts of different lengths, so that each run's audio differs (its length follows
        # the text's): the tiny random model all but ignores which words it reads, and
        # identical audio would be served from the same file, never fetched again.
        page.get_by_role("textbox").first.fill(f"Run number {run}, one sentence" + " more" * run)
        box = page.get_by_label("Stream")
        box.check() if streamed else box.uncheck()
        with page.expect_response(lambda r: "audio.wav" in r.url and r.ok,
                                  timeout=GENERATION_TIMEOUT_MS):
            page.get_by_role("button", name="Synthesize", exact=True).click()
        expect(live).to_have_count(1)
        page.wait_for_function("a => a.currentTime > 0", arg=live.element_handle(),
                               timeout=10_000)  # this run's audio is playing
        sources.append(live.get_attribute("src"))
    assert len(set(sources)) == 3  # each run attached its own source
    page.wait_for_timeout(2_000)
    playlist_polls = [url for url in requests if "playlist.m3u8" in url]
    assert len(playlist_polls) < 30, f"{len(playlist_polls)} playlist requests"


def test_a_long_text_streams_with_progress_per_chunk(page):
    text = " ".join(f"This is sentence number {i} of a long text, spoken in pieces."
                    for i in range(40))[:2000]
    page.get_by_role("tab", name="Synthesize").click()
    page.get_by_label("Text").first.fill(text)
    page.get_by_text("Generation settings").first.click()
    tokens = page.get_by_label("max_new_tokens", exact=False).first
    tokens.fill("20")  # per chunk: keeps the tiny model's run short
    tokens.press("Enter")
    expect(page.get_by_label("Stream")).not_to_be_checked()  # on a CPU (ui.stream_box)
    page.get_by_label("Stream").check()
    page.get_by_role("button", name="Synthesize", exact=True).click()
    progress = page.get_by_text(re.compile(r"Streaming chunk \d+ of 8"))
    expect(progress).to_be_visible(timeout=GENERATION_TIMEOUT_MS)
    live = page.locator("#live-audio audio")
    expect(live).to_have_count(1)  # playing while later chunks are still being made
    shoot(page, "6-streaming")
    expect(page.get_by_text("first audio")).to_be_visible(timeout=GENERATION_TIMEOUT_MS)
    assert live.evaluate("a => a.currentTime") > 0
    expect(page.locator("audio[src*='audio.wav']")).to_have_count(1)  # the whole result
    shoot(page, "7-streamed")


def test_fine_tune_a_voice_from_a_zip(page, tmp_path):
    from chatterbox_demo.speaker_data import make_espeak_dataset

    data = make_espeak_dataset(tmp_path / "speaker", 4)
    archive = shutil.make_archive(str(tmp_path / "speaker"), "zip", root_dir=tmp_path,
                                  base_dir="speaker")
    page.get_by_role("tab", name="Voices").click()
    page.get_by_text("Fine-tune a voice").click()
    page.locator("#tune-data input[type=file]").set_input_files(archive)
    page.locator("#tune-name textarea, #tune-name input").first.fill("tuned in page")
    steps = page.get_by_label("steps (up to 2000 here)", exact=True)
    steps.fill("3")
    steps.press("Enter")
    page.get_by_role("button", name="Fine-tune", exact=True).click()
    expect(page.locator("#tune-status")).to_contain_text("Fine-tuned tuned in page",
                                                         timeout=GENERATION_TIMEOUT_MS)
    expect(page.get_by_text("fine-tuned (lora)").first).to_be_visible()
    shoot(page, "8-finetuned")
    assert data.exists()


def test_an_error_is_a_readable_message_in_the_page(page):
    page.get_by_role("tab", name="Synthesize").click()
    page.get_by_label("Text").first.fill("   ")
    page.get_by_role("button", name="Synthesize", exact=True).click()
    expect(page.get_by_text("Enter some text")).to_be_visible(timeout=30_000)
    assert "Traceback" not in page.content()
    shoot(page, "5-error")


def test_html_in_an_error_is_shown_as_typed_and_stays_until_closed(page):
    name = "<i>a/b</i><img src=x>"
    page.get_by_role("tab", name="Voices").click()
    page.locator("input[type=file]").first.set_input_files(str(CLIP))
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_role("button", name="Add voice").click()
    message = page.get_by_test_id("toast-text")
    # Rendered as markup, the text would read "'a/b' looks like a path".
    expect(message).to_contain_text(f"'{name}' looks like a path", timeout=30_000)
    expect(message.locator("i, img")).to_have_count(0)
    page.wait_for_timeout(11_000)  # past Gradio's default of 10 s for a notice
    expect(message).to_be_visible()
    page.get_by_test_id("toast-close").click()
    expect(message).to_have_count(0)


def test_a_comparison_this_device_cannot_run_says_why(page):
    """The panels are checked in a step before the run; unqueued, its error reached the
    browser as a bare 500 and the page showed nothing, the last run's results still up."""
    page.get_by_role("tab", name="A/B Compare").click()
    page.get_by_label("B: preset").click()
    page.get_by_role("option", name="gpu-fast", exact=True).click()
    page.get_by_role("button", name="Run A then B").click()
    message = page.get_by_test_id("toast-text")
    expect(message).to_contain_text("Configuration B cannot run on cpu", timeout=30_000)
    shoot(page, "7-ab-unavailable")


def test_cancel_stops_a_comparison_before_b(page):
    page.get_by_role("tab", name="A/B Compare").click()
    page.get_by_label("max_new_tokens (0 = from text length)").fill("200")
    page.get_by_role("button", name="Run A then B").click()
    page.get_by_role("button", name="Cancel").click()
    summary = page.locator("#ab-summary")
    expect(summary).to_contain_text("Cancelled after A", timeout=GENERATION_TIMEOUT_MS)
    expect(page.locator("#ab-table")).to_contain_text("not run")
    expect(page.locator("#ab-table")).not_to_contain_text("null")
    expect(page.locator("#audio-a audio[src]")).to_have_count(1)
    expect(page.locator("#ab-history")).not_to_contain_text("baseline")
    # The page is usable at once: a short run completes and is the only one in history.
    page.get_by_label("max_new_tokens (0 = from text length)").fill("20")
    page.get_by_role("button", name="Run A then B").click()
    expect(summary).to_contain_text("end to end", timeout=GENERATION_TIMEOUT_MS)
    # (Gradio draws each table twice, one copy to measure column widths: count in one.)
    rows = page.locator("#ab-history table").first.locator("tbody tr")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("baseline")
