import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from PIL import Image

from kosmos.config import ConfigError
from kosmos.eval.cache import CheckpointIdentity, checkpoint_identity
from kosmos.eval.datasets import Sample
from kosmos.eval.harness import EvalOptions, evaluate, prepare_tasks
from kosmos.eval.report import score_figure
from kosmos.eval.runners import run_batch
from kosmos.eval.tasks import load_task

CLASSES = ["zero", "one", "two"]


def write_digit_set(root: Path, per_class: int = 4) -> None:
    (root / "images").mkdir(parents=True)
    rows = []
    for label in range(3):
        for n in range(per_class + 2):
            sid = f"d{label}-{n}"
            Image.new("RGB", (8, 8), (80 * label, 0, 0)).save(root / "images" / f"{sid}.png")
            rows.append(
                {
                    "id": sid,
                    "split": "test" if n < per_class else "demo",
                    "image": f"images/{sid}.png",
                    "label": label,
                    "question": "What digit is this?",
                    "answers": [str(label)] * 10,
                }
            )
    (root / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "classes.json").write_text(json.dumps(CLASSES))


def write_task(folder: Path, name: str, **changes) -> None:
    task = {
        "kind": "rank_choices",
        "data": {
            "format": "jsonl",
            "root": "digits",
            "eval": {"annotations": "set.jsonl", "classes": "classes.json", "splits": ["test"]},
            "demos": {"annotations": "set.jsonl", "classes": "classes.json", "splits": ["demo"]},
        },
        "prompt": {"query": "{image}The photo of the digit"},
        "metrics": ["accuracy"],
    }
    task.update(changes)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task))


def label_of(image) -> int:
    """The planted answer: the red level of the picture encodes the label."""
    with Image.open(image) as picture:
        return picture.getpixel((0, 0))[0] // 80


class FakeBackend:
    """Answers from the query image (the last image of a prompt); records every call."""

    def __init__(self, fail_after: int | None = None, wrong: bool = False):
        self.calls = 0
        self.wrong = wrong  # answer the next label instead (a checkpoint that learned otherwise)
        self.fail_after = fail_after
        self.generated: list = []
        self.scored: list = []

    def _tick(self):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("interrupted")

    def generate(self, prompts, decoding, max_new_tokens=None):
        self._tick()
        self.generated.extend(prompts)
        out = []
        for prompt in prompts:
            image = [p for p in prompt if not isinstance(p, str)][-1]
            out.append(
                f"about {Path(image).stem}" if max_new_tokens else str((label_of(image) + self.wrong) % 3)
            )
        return out

    def log_likelihood(self, prompts, continuations, normalize=False):
        self._tick()
        self.scored.extend(zip(prompts, continuations))
        scores = []
        for prompt, continuation in zip(prompts, continuations):
            image = [p for p in prompt if not isinstance(p, str)][-1]
            scores.append(0.0 if continuation == CLASSES[(label_of(image) + self.wrong) % 3] else -1.0)
        return scores


@pytest.fixture
def setup(tmp_path):
    write_digit_set(tmp_path / "data" / "digits")
    (tmp_path / "tasks").mkdir()
    write_task(tmp_path / "tasks", "digits_rank")
    write_task(
        tmp_path / "tasks",
        "digits_vqa",
        kind="generate",
        prompt={"query": "{image}Question: {question} Answer:"},
        metrics=["vqa_accuracy"],
    )
    return tmp_path


def options(root: Path, **changes) -> EvalOptions:
    values = {
        "tasks": ["digits_rank", "digits_vqa"],
        "out": root / "out",
        "data_root": root / "data",
        "task_dir": root / "tasks",
        "batch_size": 2,
        "bootstrap_resamples": 200,
    }
    values.update(changes)
    return EvalOptions(**values)


def test_results_predictions_and_report(setup):
    checkpoint = CheckpointIdentity("runs/x/checkpoints/step_00000020", 20, "0" * 64)
    results = evaluate(FakeBackend(), options(setup, shots=[0, 2], trials=2), checkpoint=checkpoint)
    assert results["checkpoint"] == {"path": checkpoint.path, "step": 20, "sha256": "0" * 64}
    assert set(results["data_files"]["digits_rank"]) == {
        f"data.{split}.{name}" for split in ("eval", "demos") for name in ("annotations", "classes")
    }
    rows = {(r["task"], r["shots"], r["trial"]): r for r in results["results"]}
    assert set(rows) == {
        ("digits_rank", 0, 0),
        ("digits_rank", 2, 0),
        ("digits_rank", 2, 1),
        ("digits_vqa", 0, 0),
        ("digits_vqa", 2, 0),
        ("digits_vqa", 2, 1),
    }
    row = rows[("digits_rank", 2, 1)]
    assert row["metric"] == "accuracy" and row["value"] == 100.0
    assert (
        row["ci"] == [100.0, 100.0] and row["config"]["kind"] == "rank_choices" and row["num_samples"] == 12
    )
    assert rows[("digits_vqa", 0, 0)]["value"] == 100.0
    summary = {(s["task"], s["shots"]): s for s in results["summary"]}
    assert summary[("digits_rank", 2)]["trials"] == 2 and summary[("digits_rank", 2)]["std"] == 0.0
    out = setup / "out"
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]
    lines = (
        (out / "predictions" / "digits_rank" / "random" / "2shot_trial1" / "predictions.jsonl")
        .read_text()
        .splitlines()
    )
    records = [json.loads(x) for x in lines]
    assert len(records) == 12 and all(
        len(r["demos"]) == 2 and r["prediction"] == r["answer"] for r in records
    )
    report = (out / "report.md").read_text()
    assert report.startswith("# Evaluation at step 20\n")
    assert "step 20, weights sha256 `0000000000000000`" in report and "Scores: percent" in report
    assert "| digits_rank | accuracy | 2 | 12 | 100.00 ± 0.00 (2 trials) | [100.00, 100.00] |" in report
    assert "set.jsonl" in report  # the data files are named
    assert (out / "score_vs_shots.png").stat().st_size > 0


def _entry(task, shots, value, ci):
    return {"task": task, "metric": "accuracy", "shots": shots, "value": value, "ci": ci}


@pytest.mark.parametrize("value", [0.0, 37.5, 100.0])
def test_plot_of_one_shot_count_spans_the_percent_scale(value):
    figure = score_figure(
        [_entry("a", 0, value, [value, value]), _entry("b", 0, 50.0, [40.0, 60.0])], "t", 95
    )
    axes = figure.axes[0]
    assert axes.get_xlim() == (0.0, 100.0)
    [bars_a, bars_b] = axes.patches
    assert bars_a.get_width() == value and bars_b.get_width() == 50.0
    # Each bar is labelled with its value, a zero one too, right of its whisker.
    labels = {text.get_text(): text.xy[0] for text in axes.texts}
    assert labels == {f"{value:.1f}": value, "50.0": 60.0}
    # The error bar of b spans its confidence interval.
    segments = next(c for c in axes.collections if len(c.get_segments())).get_segments()
    assert [tuple(point[0] for point in segment) for segment in segments][1] == (40.0, 60.0)


def test_plot_of_several_shot_counts_draws_intervals_against_shots():
    summary = [_entry("a", 0, 20.0, [10.0, 30.0]), _entry("a", 4, 60.0, [55.0, 65.0])]
    axes = score_figure(summary, "t", 95).axes[0]
    assert list(axes.get_xticks()) == [0, 4] and axes.get_ylim() == (0.0, 100.0)
    [container] = axes.containers
    line, _, (bars,) = container.lines
    assert list(line.get_ydata()) == [20.0, 60.0]
    assert [tuple(point[1] for point in segment) for segment in bars.get_segments()] == [
        (10.0, 30.0),
        (55.0, 65.0),
    ]


def test_interrupted_evaluation_continues_where_it_stopped(setup):
    crashing = FakeBackend(fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        evaluate(crashing, options(setup, tasks=["digits_rank"]))
    path = setup / "out" / "predictions" / "digits_rank" / "0shot" / "predictions.jsonl"
    done = len(path.read_text().splitlines())
    assert done == 3 * 2  # three batches of two were written before the interruption
    resumed = FakeBackend()
    results = evaluate(resumed, options(setup, tasks=["digits_rank"]))
    scored_images = {str([p for p in prompt if not isinstance(p, str)][-1]) for prompt, _ in resumed.scored}
    assert len(scored_images) == 12 - done
    assert results["results"][0]["num_samples"] == 12
    assert len(path.read_text().splitlines()) == 12


def _scored_images(backend) -> list[str]:
    return sorted({str([p for p in prompt if not isinstance(p, str)][-1]) for prompt, _ in backend.scored})


def test_another_checkpoint_reruns_every_prediction(setup):
    step20 = CheckpointIdentity("run/checkpoints/step_00000020", 20, "a" * 64)
    first = evaluate(FakeBackend(), options(setup, tasks=["digits_rank"]), checkpoint=step20)
    again = FakeBackend()
    evaluate(again, options(setup, tasks=["digits_rank"]), checkpoint=step20)
    assert again.calls == 0
    step24 = CheckpointIdentity("run/checkpoints/step_00000024", 24, "b" * 64)
    trained = FakeBackend(wrong=True)
    second = evaluate(trained, options(setup, tasks=["digits_rank"]), checkpoint=step24)
    assert len(_scored_images(trained)) == 12
    assert first["results"][0]["value"] == 100.0 and second["results"][0]["value"] == 0.0
    assert second["checkpoint"]["step"] == 24


def _edit_rows(path: Path, edit) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(edit(r)) + "\n" for r in rows))


def test_changed_annotations_rerun_only_the_affected_predictions(setup):
    opts = options(setup, tasks=["digits_vqa"], shots=[0, 2])
    evaluate(FakeBackend(), opts)
    annotations = setup / "data" / "digits" / "set.jsonl"
    few_shot = setup / "out" / "predictions" / "digits_vqa" / "random" / "2shot_trial0" / "predictions.jsonl"
    users_of_d0_4 = {
        r["id"] for r in map(json.loads, few_shot.read_text().splitlines()) if "d0-4" in r["demos"]
    }
    assert users_of_d0_4

    def edit(row):
        if row["id"] == "d1-0":  # an evaluated question: its prompt changes
            row["question"] = "Which digit is shown?"
        if row["id"] == "d2-0":  # an evaluated sample's answers: only its score changes
            row["answers"] = ["9"] * 10
        if row["id"] == "d0-4":  # a demonstration's answer: the prompts that show it change
            row["label"] = 2
        return row

    _edit_rows(annotations, edit)
    backend = FakeBackend()
    results = evaluate(backend, opts)
    questions = [p[-1] for p in backend.generated]
    zero_shot = [q for q in questions if "Which digit" in q]
    assert zero_shot and len(questions) == 2 + len(users_of_d0_4 - {"d1-0"})
    values = {r["shots"]: r["value"] for r in results["results"]}
    assert values[0] == pytest.approx(100 * 11 / 12)  # d2-0 is scored against its new answers


def test_trailing_slash_names_the_same_checkpoint(tmp_path, tiny_config):
    from kosmos import config as config_io
    from kosmos.model import KosmosModel

    folder = tmp_path / "run" / "checkpoints" / "step_00000020"
    folder.mkdir(parents=True)
    config_io.dump(tiny_config, folder / "model.yaml")
    (folder.parent / "latest").write_text("step_00000020")
    model = KosmosModel(tiny_config)
    plain = checkpoint_identity(tmp_path / "run", model)
    assert plain == checkpoint_identity(f"{tmp_path / 'run'}/", model) == checkpoint_identity(folder, model)
    assert plain.step == 20 and plain.path == str(folder.resolve())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert checkpoint_identity(tmp_path / "run", model).sha256 != plain.sha256


def test_zero_shot_only_task_skips_few_shot(setup):
    write_task(
        setup / "tasks",
        "no_demos",
        data={
            "format": "jsonl",
            "root": "digits",
            "eval": {"annotations": "set.jsonl", "classes": "classes.json", "splits": ["test"]},
        },
    )
    results = evaluate(FakeBackend(), options(setup, tasks=["no_demos"], shots=[0, 4]))
    assert [r["shots"] for r in results["results"]] == [0]


def test_chain_of_thought_passes_stage_one_into_stage_two():
    task = load_task("rendered_sst2_cot")
    samples = [
        Sample(f"s{i}", {"image": [Path(f"s{i}.png")]}, choices=["negative", "positive"], answer=i % 2)
        for i in range(3)
    ]
    backend = FakeBackend()
    backend.log_likelihood = lambda prompts, continuations, normalize=False: (
        backend.scored.extend(zip(prompts, continuations)) or [0.0] * len(prompts)
    )
    records = run_batch(task, backend, samples, [[] for _ in samples])
    stage_one = backend.generated
    assert [p for p in stage_one] == [
        [Path(f"s{i}.png"), "Introduce this picture in detail:"] for i in range(3)
    ]
    assert len(backend.scored) == 6
    for prompt, _ in backend.scored:
        image = prompt[0]
        assert prompt[1].startswith(f"about {image.stem} Question: what is the sentiment")
    assert [r["rationale"] for r in records] == [f"about s{i}" for i in range(3)]


def test_rank_images_puts_each_candidate_in_turn():
    task = load_task("raven_generated")
    sample = Sample(
        "p",
        {"context": [Path("c0"), Path("c1"), Path("c2")], "candidate": [Path(f"k{i}") for i in range(4)]},
        {"count": "three"},
        choices=["0", "1", "2", "3"],
        answer=2,
    )
    backend = FakeBackend()
    seen = []

    def score(prompts, continuations, normalize=False):
        seen.extend(zip(prompts, continuations))
        return [1.0 if prompt[5] == Path("k2") else 0.0 for prompt in prompts]

    backend.log_likelihood = score
    [record] = run_batch(task, backend, [sample], [[]])
    assert record["prediction"] == 2
    assert [p[5] for p, _ in seen] == [Path(f"k{i}") for i in range(4)]
    assert all(c == "Yes" and p[0] == "Here are three images:" and p[-1] == "Is it correct?" for p, c in seen)


def _rank_main(rank: int, world: int, root: str, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = FakeBackend()
    result = evaluate(backend, options(Path(root), tasks=["digits_rank"], batch_size=2))
    images = sorted(str([p for p in prompt if not isinstance(p, str)][-1]) for prompt, _ in backend.scored)
    queue.put((rank, sorted(set(images)), result))
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.slow
def test_samples_are_sharded_over_ranks_and_gathered_on_rank_zero(setup):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    processes = [context.Process(target=_rank_main, args=(r, 2, str(setup), port, queue)) for r in range(2)]
    for p in processes:
        p.start()
    outputs = sorted(queue.get() for _ in processes)
    for p in processes:
        p.join(60)
        assert p.exitcode == 0
    (_, images0, result0), (_, images1, result1) = outputs
    assert images0 and images1 and not set(images0) & set(images1)
    assert len(images0) + len(images1) == 12
    assert (
        result1 is None
        and result0["results"][0]["num_samples"] == 12
        and result0["results"][0]["value"] == 100.0
    )
    lines = (
        (setup / "out" / "predictions" / "digits_rank" / "0shot" / "predictions.jsonl")
        .read_text()
        .splitlines()
    )
    assert sorted(json.loads(x)["id"] for x in lines) == sorted(
        f"d{c}-{n}" for c in range(3) for n in range(4)
    )


def test_more_shots_than_demonstrations_stop_before_the_model_loads(setup):
    with pytest.raises(ConfigError, match=r"10000 demonstrations asked for but the demo pool has \d+"):
        prepare_tasks(options(setup, shots=[0, 10_000]))


def test_limit_draws_across_the_answers():
    from kosmos.eval.datasets import Sample
    from kosmos.eval.harness import spread

    # Sorted by class, as a class-folder task reads: the first 10 hold two classes of ten.
    samples = [
        Sample(id=f"{c}-{i}", choices=[str(k) for k in range(10)], answer=c)
        for c in range(10)
        for i in range(5)
    ]
    drawn = spread(samples, 10, seed=0)
    assert sorted(s.answer for s in drawn) == list(range(10))
    assert drawn == sorted(drawn, key=samples.index)  # in the file's order
    assert spread(samples, 10, seed=0) == drawn and spread(samples, 10, seed=1) != drawn
    assert len({s.answer for s in spread(samples, 25, seed=3)}) == 10 and len(spread(samples, 99, 0)) == 50
    assert {s.answer for s in samples[:10]} == {0, 1}


def test_list_tasks_names_every_task_with_its_kind_and_metrics(capsys):
    from kosmos.cli import main
    from kosmos.eval.tasks import list_tasks

    assert main(["eval", "--list-tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_tasks()
    assert any(line.split()[:2] == ["digits_vqa", "generate"] and "vqa_accuracy" in line for line in lines)
    assert main(["eval", "--tasks", "digits_vqa"]) == 2
    assert "--checkpoint, --out: required (or --watch RUN --tasks, or --list-tasks)" in capsys.readouterr().err
