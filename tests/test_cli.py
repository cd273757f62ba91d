"""The command line: fast help, one-line errors with documented exit codes, config syntax."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import kosmos.model.cli
from kosmos import __version__
from kosmos.cli import EXIT_FAILURE, EXIT_USAGE, build_parser, main
from kosmos.config import ConfigError
from kosmos.train.config import load_train_config

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "deepspeed", "open_clip", "transformers")

EVERY_HELP = """
import sys
from kosmos.cli import build_parser
commands = [[], ["train"], ["eval"], ["generate"], ["data", "build", "caption"], ["bench", "data"],
            ["convert", "to-hf"], ["mmcot", "rationales"], ["model", "summary"]]
for command in commands:
    try:
        build_parser().parse_args([*command, "--help"])
    except SystemExit:
        pass
print(sorted(name for name in sys.modules if name.split(".")[0] in {HEAVY}))
"""


def test_help_imports_no_heavy_module():
    code = EVERY_HELP.replace("{HEAVY}", repr(set(HEAVY)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: kosmos train" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_index_help_names_every_shard_suffix_the_loader_reads(capsys):
    from kosmos.data.shards import SHARD_SUFFIXES

    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "index", "--help"])
    text = capsys.readouterr().out
    assert all(f"{suffix}," in text or f"{suffix})" in text for suffix in SHARD_SUFFIXES)


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"kosmos {__version__}"


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_an_unreadable_image_is_one_line_and_exit_code_2(capsys, tmp_path):
    code = main(
        ["generate", "--checkpoint", str(tmp_path), "--image", str(REPO / "README.md"), "--prompt", "A"]
    )
    assert code == EXIT_USAGE
    (line,) = stderr_lines(capsys)
    assert line.startswith("kosmos generate: error: --image:") and "README.md" in line
    assert "BytesIO" not in line

    code = main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "A"])
    assert code == EXIT_USAGE
    (line,) = stderr_lines(capsys)
    assert "none is neither a run folder with checkpoints nor a checkpoint folder" in line


def test_impossible_counts_are_usage_errors(capsys):
    for argv in (
        ["bench", "data", "--config", "x.yaml", "--steps", "0"],
        ["generate", "--prompt", "A", "--checkpoint", "x", "--max-new-tokens", "-1"],
    ):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == EXIT_USAGE
        assert "must be at least 1" in capsys.readouterr().err


def test_plan_options_without_dry_run_stop_before_training(capsys):
    argv = ["train", "--config", "configs/train/tiny.yaml", "--gpus", "8", "--json"]
    assert main(argv) == EXIT_USAGE
    (line,) = stderr_lines(capsys)
    assert "--gpus, --json: only with --dry-run" in line


def test_yaml_syntax_errors_name_file_line_and_column(capsys, tmp_path):
    bad = tmp_path / "model.yaml"
    bad.write_text("text:\n  layers: [2, 3\nvision: {}\n")
    assert main(["model", "summary", "--config", str(bad)]) == EXIT_USAGE
    (line,) = stderr_lines(capsys)
    assert line.startswith(f"kosmos model: config error: {bad}:3:")
    assert "invalid YAML" in line


def test_debug_keeps_the_traceback_and_unexpected_errors_always_show_it(capsys, monkeypatch):
    def fails(error):
        def handler(args):
            raise error

        return handler

    monkeypatch.setattr(kosmos.model.cli, "_summary", fails(ConfigError("model.text.layers: planted")))
    assert main(["model", "summary", "--config", "x"]) == EXIT_USAGE
    assert stderr_lines(capsys) == ["kosmos model: config error: model.text.layers: planted"]
    assert main(["--debug", "model", "summary", "--config", "x"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith(
        "kosmos model: config error: model.text.layers: planted"
    )

    monkeypatch.setattr(kosmos.model.cli, "_summary", fails(ZeroDivisionError("a bug")))
    assert main(["model", "summary", "--config", "x"]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err

    monkeypatch.setattr(kosmos.model.cli, "_summary", fails(KeyboardInterrupt()))
    assert main(["model", "summary", "--config", "x"]) == 130


def test_scientific_notation_is_a_number_in_files_and_overrides(tmp_path):
    recipe = yaml.safe_load((REPO / "configs/train/tiny.yaml").read_text())
    recipe["model"] = str(REPO / "configs/model/tiny.yaml")
    recipe["optimizer"]["lr"] = "LR"
    recipe["logging"] = {"peak_tflops": "PEAK"}
    recipe["deepspeed"]["extra"] = {"zero_optimization": {"reduce_bucket_size": "BUCKET"}}
    path = tmp_path / "train.yaml"
    text = yaml.safe_dump(recipe).replace("LR", "2e-3").replace("PEAK", "1E+2").replace("BUCKET", "5e8")
    path.write_text(text)
    assert "lr: 2e-3" in path.read_text()
    cfg = load_train_config(path)
    assert cfg.optimizer.lr == 2e-3 and cfg.logging.peak_tflops == 100.0
    assert cfg.deepspeed.extra["zero_optimization"]["reduce_bucket_size"] == 5e8
    cfg = load_train_config(path, ["optimizer.lr=1e-3", "optimizer.weight_decay=.5e-1"])
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (1e-3, 0.05)
    with pytest.raises(ConfigError, match=r"optimizer\.eps: must not be negative"):
        load_train_config(path, ["optimizer.eps=-1.5E-8"])
