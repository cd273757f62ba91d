"""Every `kosmos` command in the fenced blocks of README.md and docs/ that names no placeholder is
either run here, as written, in a folder laid out as a clone (with tiny sizes appended), or listed
with the reason it cannot run on a CPU in a test: a command added to or changed in the docs fails
this test until it is one or the other, so the docs cannot drift from the code.

One tiny run (2 steps of a one-layer model) serves every command that needs a checkpoint.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, clone_configs
from PIL import Image

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCED = re.compile(r"```([^\n]*)\n(.*?)```", re.DOTALL)
SHELL = ("", "bash", "sh", "shell", "console")
# A template, not a command: upper-case placeholders (DIR, RUN), elisions, alternatives, options.
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9_]+\b|\.\.\.|[\[\]{}|<>]")

TINY_TRAIN = [
    "train.max_steps=2", "checkpoint.interval=2", "model.text.layers=1", "data.num_workers=0",
    "logging.progress_bar=false", "logging.tensorboard=false",
]  # fmt: skip
# Run in this order, each exactly as the docs write it, then the extras.
RUN = [
    ("kosmos data sample --out sample", []),
    ("kosmos train --config configs/train/tiny.yaml --run-dir runs/tiny", TINY_TRAIN),
    ("kosmos eval --checkpoint runs/tiny --tasks digits_vqa --data-root sample --out runs/tiny/eval", ["--limit", "4"]),
    ('kosmos generate --checkpoint runs/tiny --image a.png --prompt "An image of"', ["--max-new-tokens", "3"]),
    (
        ('kosmos generate --checkpoint runs/tiny --image a.png --prompt "A seven." --image b.png --prompt "A" '
        "--beams 5"),
        ["--max-new-tokens", "3"],
    ),
    ("kosmos report runs/tiny", []),
    ("kosmos convert to-hf runs/tiny runs/tiny/hf", []),
    ("kosmos tokenizer train --corpus sample --vocab-size 64000 --placeholders --out tokenizers/sentencepiece.model", []),
    ("kosmos tokenizer inspect tokenizers/sentencepiece.model", []),
    # The paper recipe's plan, on the sample corpus in corpora/ (the layout the recipe names).
    ("kosmos train --config configs/train/kosmos1.yaml --dry-run --gpus 48 --gpu-memory 80", ["data.num_workers=1"]),
]
# Commands with nothing left to fill in that a CPU test cannot run, each with why.
NOT_RUN = [
    (r"^make (demo|test)$", "the demo and the suite themselves (tests/test_demo.py runs the demo's recipe)"),
    (r"^kosmos bench gpu", "needs CUDA"),
    (r"--device cuda|lm_eval_model", "needs CUDA and lm-eval's downloaded tasks"),
    (r"^kosmos serve ", "a server that runs until stopped (tests/test_serve.py drives the page)"),
    (r"^kosmos eval --watch ", "watches a run until stopped"),
    (r"configs/train/(kosmos1|kosmos1_instruct|mmcot_(rationale|answer|direct))\.yaml(?!.*--dry-run)",
     "trains or benchmarks the paper-size model"),
    (r"kosmos-2-patch14-224|clip-vit-large-patch14|ckpt/kosmos2", "needs a model downloaded from the Hub"),
    (r"s3://|gs://|https?://", "needs an object store or a web server (tests/test_data_sources.py serves them locally)"),
    (r"--dry-run --gpus 48$", "the README's dry run, with the default --gpu-memory"),
    (r"--dry-run --gpus 8 data.corpora", "the README's plan on 8 GPUs (tests/test_train_plan.py plans 8)"),
    (r"--run-dir runs/tiny_zero3", "the demo's training under ZeRO-3 (tests/test_train_runs.py trains ZeRO-3)"),
    (r"--gpus 64", "64 ranks x 4 loader workers need more documents than the sample's 93 texts (docs/training.md)"),
    (r"--tasks digits_classification,digits_vqa,digits_captioning --shots 0,2 --trials 3",
     "the demo's full evaluation (minutes); the README's evaluation runs"),
    (r"^kosmos data build |^kosmos tokenizer train --corpus corpora/|^kosmos tokenizer inspect ckpt/",
     "reads the reader's own files (docs.jsonl, captions.tsv, laion/*.tar, scienceqa/, corpora/)"),
    (r"runs/mmcot_|evals/", "the paper-size chain-of-thought stages"),
    (r"^kosmos convert to-hf runs/tiny hf/tiny$", "the same export as the README's, to another folder"),
]  # fmt: skip


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for each `kosmos` command line of the pages' shell blocks, comments cut."""
    found = []
    for page in PAGES:
        for block in (body for language, body in FENCED.findall(page.read_text()) if language.strip() in SHELL):
            for line in block.replace("\\\n", " ").splitlines():
                command = re.sub(r"\s+#.*$", "", line).strip()
                words = command.split()
                # `kosmos train: config error: ...` is output shown in a block, not a command.
                if len(words) > 1 and words[0] in ("kosmos", "make", "python") and not words[1].endswith(":"):
                    found.append((page.name, " ".join(words)))
    return found


def test_every_documented_command_is_run_or_has_a_reason():
    run = {" ".join(command.split()) for command, _ in RUN}
    unclassified = [
        (page, command)
        for page, command in documented_commands()
        if not PLACEHOLDER.search(command)
        and command not in run
        and not any(re.search(pattern, command) for pattern, _ in NOT_RUN)
    ]
    assert not unclassified, f"run these in RUN or give a reason in NOT_RUN: {unclassified}"
    documented = {command for _, command in documented_commands()}
    stale = sorted(run - documented)
    assert not stale, f"no longer in the docs (update RUN): {stale}"


@pytest.mark.slow
def test_the_documented_commands_run(tmp_path):
    clone_configs(tmp_path)
    digit = np.kron(np.eye(8, dtype=np.uint8) * 255, np.ones((8, 8), np.uint8))
    for name in ("a.png", "b.png"):  # the reader's pictures
        Image.fromarray(digit).save(tmp_path / name)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for command, extras in RUN:
        if command.startswith("kosmos train --config configs/train/kosmos1.yaml --dry-run --gpus 48"):
            (tmp_path / "corpora").mkdir()
            for kind in ("text", "caption", "interleaved"):
                (tmp_path / "corpora" / kind).symlink_to(tmp_path / "sample" / kind)
        argv = [sys.executable, "-m", "kosmos", *shlex.split(command)[1:], *extras]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, f"{command}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
