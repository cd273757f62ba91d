"""An installed kosmos (a built wheel, not the checkout) works from any folder: it finds the configs it
reads itself (DeepSpeed's, the stock evaluation tasks) inside the package."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip"]


def run(command: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    # No PYTHONPATH: the checkout must not be importable, only what the wheel installed.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    done = subprocess.run(
        [str(c) for c in command],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"{' '.join(map(str, command))}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    )
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtualenv with the wheel built from this checkout; torch and the other dependencies
    are read from the environment running the tests. Returns the virtualenv's `bin/`."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # built from a copy: the build leaves build/ and *.egg-info behind
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    shutil.copytree(REPO / "kosmos", source / "kosmos", ignore=shutil.ignore_patterns("__pycache__"))
    offline = ["-q", "--no-deps", "--no-index"]
    run([*PIP, "wheel", *offline, "--no-build-isolation", "-w", root / "dist", source], root)
    [wheel] = (root / "dist").glob("kosmos-*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", venv], root)
    # The dependencies: this environment's site-packages as a plain path, after the new one's own (its
    # .pth files are not run, so an editable kosmos there stays invisible).
    purelib = sysconfig.get_path("purelib", "venv", vars={"base": str(venv), "platbase": str(venv)})
    Path(purelib, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([*PIP, "--python", venv / "bin/python", "install", *offline, wheel], root)
    return venv / "bin"


@pytest.mark.slow
def test_the_wheel_trains_and_finds_its_configs_from_another_folder(installed, tmp_path):
    where = run([installed / "python", "-c", "import kosmos; print(kosmos.__file__)"], tmp_path).stdout
    assert Path(where.strip()).is_relative_to(installed.parent)
    tasks = "from kosmos.eval.tasks import load_task; print(load_task('digits_vqa').name)"
    assert "digits_vqa" in run([installed / "python", "-c", tasks], tmp_path).stdout

    run([installed / "kosmos", "data", "sample", "--out", "sample"], tmp_path)
    config = REPO / "configs/train/tiny.yaml"
    inputs = [f"tokenizer={tmp_path / 'sample/tokenizer.model'}"]
    inputs += [
        f"data.corpora.{i}.path={tmp_path / 'sample' / kind}"
        for i, kind in enumerate(("text", "caption", "interleaved"))
    ]
    plan = run([installed / "kosmos", "train", "--config", config, "--dry-run", *inputs], tmp_path).stdout
    assert "ZeRO" in plan
    short = ["train.max_steps=2", "checkpoint.interval=2", "data.num_workers=0", "logging.progress_bar=false"]
    run([installed / "kosmos", "train", "--config", config, "--run-dir", "run", *inputs, *short], tmp_path)
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_00000002"


@pytest.mark.slow
def test_the_wheel_declares_its_lmms_eval_model_and_task_files(installed, tmp_path):
    probe = (
        "import importlib.metadata as md, pathlib, kosmos.configs as c; "
        "print([e.value for e in md.entry_points(group='lmms_eval.models') if e.name == 'kosmos']); "
        "print(sorted(p.name for p in (pathlib.Path(c.__file__).parent / 'lmms').iterdir() if p.is_file()))"
    )
    entry, files = run([installed / "python", "-c", probe], tmp_path).stdout.splitlines()
    assert "kosmos.eval.lmms_entry:manifest" in entry
    assert files == "['kosmos_caption.yaml', 'kosmos_vqa.yaml', 'utils.py']"


@pytest.mark.slow
def test_lmms_eval_registers_the_installed_model_when_kosmos_is_imported_first(installed, tmp_path):
    pytest.importorskip("lmms_eval")
    folder = run([installed / "python", "-m", "kosmos.eval.lmms_entry"], tmp_path).stdout
    assert folder.count("\n") == 1 and (Path(folder.strip()) / "kosmos_caption.yaml").is_file()
    # The Python route: our module first, which starts lmms-eval's reading of its entry points.
    probe = (
        "import kosmos.eval.lmms_model as m; from lmms_eval.models import get_model; "
        "assert get_model('kosmos') is m.KosmosLMMS"
    )
    done = run([installed / "python", "-c", probe], tmp_path)
    assert "Failed to load model entry-point" not in done.stdout + done.stderr
