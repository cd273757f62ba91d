"""`kosmos serve`: the prompt's layout and the page, driven end to end in a headless chromium (Debian's
`chromium` package, through playwright, which downloads no browser): a generation, a file that is
not an image, an image over the upload limit."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from kosmos.config import InputError
from kosmos.model.prompting import Decoding
from kosmos.serve import equivalent_command, interleave

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def test_marks_place_the_images_and_the_command_line_says_the_same():
    a, b = object(), object()
    assert interleave("<image> An image of", [a]) == [a, " An image of"]
    assert interleave("A cat.", [a, b]) == [a, b, "A cat."]  # no marks: the images first
    assert interleave("<image>A cat. <image>A", [a, b]) == [a, "A cat. ", b, "A"]
    with pytest.raises(InputError, match="marks 2 images with <image>, but 1 were uploaded"):
        interleave("<image> and <image>", [a])
    command = equivalent_command("runs/tiny", "<image>A cat. <image>A", ["a.png", "b.png"], Decoding(12, 3))
    assert command == (
        "kosmos generate --checkpoint runs/tiny --image a.png --prompt 'A cat. ' --image b.png --prompt A "
        "--max-new-tokens 12 --beams 3"
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A tiny model with random weights, as a checkpoint folder."""
    from kosmos.convert.hf import save_checkpoint
    from kosmos.model import KosmosModel, load_model_config

    cfg = load_model_config(
        REPO / "configs/model/tiny.yaml", [f"text.vocab_size={tokenizer.vocab_size}", "text.layers=1"]
    )
    out = tmp_path_factory.mktemp("serve") / "checkpoint"
    return save_checkpoint(KosmosModel(cfg).state_dict(), cfg, tokenizer.model_file, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(checkpoint):
    pytest.importorskip("gradio")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "kosmos", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
         "--max-upload-mb", "1"],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"kosmos serve did not come up: {server.stdout.read()[-3000:]}")
            time.sleep(1)
    yield url
    server.terminate()
    server.wait(30)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if CHROMIUM is None:
        pytest.skip("no chromium here (apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        # launch() gives the browser a fresh profile folder of its own, removed when it closes.
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield instance
        instance.close()


def upload_and_generate(browser, url: str, files: list[Path], prompt: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    page.set_input_files("input[type=file]", [str(f) for f in files])
    for f in files:
        page.get_by_text(f.name).first.wait_for(timeout=30_000)  # uploaded
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_role("button", name="Generate").click()
    return page


@pytest.mark.slow
def test_the_page_generates_and_refuses_bad_uploads(page_url, browser, tmp_path):
    picture = tmp_path / "digit.png"
    Image.fromarray(np.kron(np.eye(8, dtype=np.uint8) * 255, np.ones((8, 8), np.uint8))).save(picture)
    page = upload_and_generate(browser, page_url, [picture], "<image> An image of")
    settings = page.get_by_label("Settings")
    page.wait_for_function(
        "() => [...document.querySelectorAll('textarea')].some(t => t.value.includes('kosmos generate'))",
        timeout=120_000,
    )
    assert "greedy, at most 20 new tokens" in settings.input_value()
    assert "--image digit.png --prompt ' An image of' --max-new-tokens 20" in settings.input_value()
    assert page.get_by_label("Generation").input_value().strip()  # random weights: some text
    page.screenshot(path=str(tmp_path / "serve-after-generation.png"), full_page=True)
    page.close()

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not a picture")
    page = upload_and_generate(browser, page_url, [not_an_image], "<image> An image of")
    page.get_by_text("notes.png cannot be used: not an image (JPEG, PNG or WebP)").wait_for(timeout=60_000)
    page.close()

    too_large = tmp_path / "noise.png"
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    Image.fromarray(noise).save(too_large)
    assert too_large.stat().st_size > 2**20
    page = upload_and_generate(browser, page_url, [too_large], "<image> An image of")
    page.get_by_text("noise.png is 1.8 MiB, over the 1 MiB an image may have").wait_for(timeout=60_000)
    page.screenshot(path=str(tmp_path / "serve-too-large.png"), full_page=True)
    page.close()
