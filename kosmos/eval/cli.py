"""`kosmos eval`: zero- and few-shot evaluation of a checkpoint on registered tasks; `kosmos mmcot`:
the two stages of multimodal chain-of-thought on ScienceQA at test time (docs/mmcot.md)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from kosmos.cli import FP32_HELP, positive_int
from kosmos.config import ConfigError
from kosmos.threads import configure_threads

# The default retrieval CLIP of --demos rices/stratified (and of the lmms-eval task files): the CLIP
# KOSMOS-1's vision tower starts from.
RETRIEVAL_CLIP = "ViT-L-14-quickgelu"

COMPILE_HELP = (
    "decode with torch.compile'd steps: the same text, faster over many prompts after a one-time "
    "compilation (tens of seconds; needs a C++ compiler on CPU)"
)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="zero- and few-shot evaluation (captioning, VQA, Raven, chain-of-thought, classification)",
        description="Evaluate a checkpoint on tasks defined in YAML files (the stock ones ship in the "
        "package, kosmos/configs/eval/). Under torchrun the samples are sharded over the ranks and rank 0 "
        "writes the results.",
    )
    parser.add_argument(
        "--list-tasks", action="store_true", help="list the tasks of --task-dir (kind, format, metrics) and exit"
    )
    # Required unless --list-tasks (checked by the handler): --checkpoint and --out, or --watch.
    parser.add_argument("--checkpoint", help="run folder (its latest checkpoint) or checkpoint folder")
    parser.add_argument(
        "--watch",
        type=Path,
        metavar="RUN",
        help="instead of --checkpoint: evaluate each checkpoint of run folder RUN once, in step order, as "
        "it appears, into RUN/eval/ (history.jsonl and the run's TensorBoard), until its last step's",
    )
    parser.add_argument("--tasks", help="comma-separated task names (NAME.yaml in --task-dir) or YAML paths")
    parser.add_argument(
        "--out", type=Path, help="output folder (not with --watch); a rerun continues from its cache"
    )
    watching = parser.add_argument_group("--watch")
    watching.add_argument(
        "--every", type=positive_int, default=1, help="only checkpoints of steps that are multiples of N "
        "(and the run's last step); default 1"
    )
    watching.add_argument(
        "--poll", type=float, default=60.0, help="seconds between looks for new checkpoints (default 60)"
    )
    watching.add_argument("--once", action="store_true", help="evaluate the checkpoints there now, then stop")
    parser.add_argument(
        "--shots", type=_int_list, default=[0], help="demonstration counts, e.g. 0,4,8 (default 0)"
    )
    parser.add_argument(
        "--demos",
        default="random",
        choices=("random", "rices", "stratified"),
        help="how demonstrations are chosen (default random)",
    )
    parser.add_argument(
        "--trials", type=positive_int, default=1, help="repeats with different random demonstrations"
    )
    parser.add_argument(
        "--limit",
        type=positive_int,
        help="evaluate N samples of each task, drawn with --seed as evenly as they allow over the answers "
        "(classes)",
    )
    parser.add_argument("--limit-first", action="store_true", help="with --limit: the first N samples instead")
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, help="prompts per forward pass and rank"
    )
    parser.add_argument(
        "--data-root", type=Path, default=Path("."), help="folder the tasks' data roots are in"
    )
    parser.add_argument(
        "--task-dir", type=Path, help="where task names are looked up (default: the stock tasks, kosmos/configs/eval)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of demonstration draws and bootstrap")
    parser.add_argument("--device", help="default: cuda (the rank's GPU) when available, else cpu")
    parser.add_argument("--fp32", action="store_true", help=FP32_HELP)
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    parser.add_argument(
        "--retrieval-clip",
        default=RETRIEVAL_CLIP,
        help="open_clip model name for --demos rices/stratified",
    )
    parser.add_argument(
        "--retrieval-weights", help="local open_clip checkpoint file for --demos rices/stratified"
    )
    parser.set_defaults(handler=_eval)
    _register_mmcot(subparsers)


def _list_tasks(task_dir: Path | None) -> int:
    from kosmos.eval.tasks import list_tasks, load_task

    for name in list_tasks(task_dir):
        task = load_task(name, task_dir)
        shots = "few-shot" if task.few_shot else "zero-shot"
        print(f"{name:<24} {task.kind:<13} {task.data.format:<16} {shots:<9} {', '.join(task.metrics)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.list_tasks:
        return _list_tasks(args.task_dir)
    needed = ("watch", "tasks") if args.watch is not None else ("checkpoint", "tasks", "out")
    missing = [f"--{name}" for name in needed if getattr(args, name) is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: required (or --watch RUN --tasks, or --list-tasks)")
    if args.watch is not None and (args.checkpoint or args.out):
        raise ConfigError("--watch: evaluates RUN's checkpoints into RUN/eval, without --checkpoint or --out")
    from kosmos.config import to_dict
    from kosmos.distributed import local_device
    from kosmos.eval.backend import ModelBackend, load_for_eval
    from kosmos.eval.cache import checkpoint_identity
    from kosmos.eval.demos import ClipEmbedder
    from kosmos.eval.harness import EvalOptions, evaluate, prepare_tasks
    from kosmos.model import inference_dtype

    if args.watch is not None and not (args.watch / "config.yaml").is_file():
        raise ConfigError(f"--watch: {args.watch} is not a run folder (it has no config.yaml)")
    options = EvalOptions(
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        out=args.out or args.watch / "eval",
        shots=args.shots,
        demos=args.demos,
        trials=args.trials,
        limit=args.limit,
        limit_first=args.limit_first,
        batch_size=args.batch_size,
        data_root=args.data_root,
        task_dir=args.task_dir,
        seed=args.seed,
    )
    options.validate()
    tasks = prepare_tasks(options)  # every task file and data set checked before the model loads
    retrieval = args.demos != "random" and any(s > 0 for s in options.shots)
    if retrieval and not args.retrieval_weights:
        raise ConfigError(f"--demos {args.demos}: needs --retrieval-weights (a local open_clip checkpoint)")
    if retrieval:
        ClipEmbedder.check(args.retrieval_clip, args.retrieval_weights)
    device = args.device or local_device()

    def load(checkpoint):
        return load_for_eval(checkpoint, device, inference_dtype(device, args.fp32))

    def run(checkpoint, loaded, embedder, out: Path) -> dict | None:
        model, tokenizer, model_cfg = loaded
        return evaluate(
            ModelBackend(model, tokenizer, options.batch_size, args.compile),
            dataclasses.replace(options, out=out),
            checkpoint_identity(checkpoint, model),
            to_dict(model_cfg),
            embedder,
            tasks,
        )

    if args.watch is not None:
        from kosmos.eval.watch import watch

        configure_threads()
        embedder = ClipEmbedder(args.retrieval_clip, args.retrieval_weights, device) if retrieval else None
        return watch(
            args.watch, lambda checkpoint, out: run(checkpoint, load(checkpoint), embedder, out), args.every,
            args.poll, args.once,
        )  # fmt: skip
    loaded = load(args.checkpoint)
    configure_threads()  # once the inputs are known to be good: an error stays one line
    embedder = ClipEmbedder(args.retrieval_clip, args.retrieval_weights, device) if retrieval else None
    results = run(args.checkpoint, loaded, embedder, options.out)
    if results is not None:
        print((options.out / "report.md").read_text())
    return 0


def _register_mmcot(subparsers: argparse._SubParsersAction) -> None:
    mmcot = subparsers.add_parser(
        "mmcot",
        help="multimodal chain-of-thought on ScienceQA: stage-1 rationales, then stage-2 answers",
        description="Run `rationales` with the stage-1 checkpoint, then `answers` with the stage-2 "
        "checkpoint and --rationales OUT/predictions.jsonl (matched by problem id). See docs/mmcot.md.",
    )
    commands = mmcot.add_subparsers(dest="mmcot_command", required=True)
    rationales = commands.add_parser("rationales", help="stage 1: a rationale per problem, ROUGE-L")
    rationales.add_argument("--max-new-tokens", type=positive_int, default=512)
    answers = commands.add_parser("answers", help="stage 2 (or the one-stage baseline): accuracy")
    answers.add_argument(
        "--rationales",
        type=Path,
        help="stage-1 predictions.jsonl (id, prediction); without it the problems are answered directly "
        "(the one-stage baseline, for a checkpoint fine-tuned on the direct stage)",
    )
    answers.add_argument("--max-new-tokens", type=positive_int, default=16)
    for command, handler in ((rationales, _mmcot_rationales), (answers, _mmcot_answers)):
        command.add_argument(
            "--checkpoint", required=True, help="run folder (its latest checkpoint) or checkpoint folder"
        )
        command.add_argument(
            "--data",
            required=True,
            type=Path,
            help="ScienceQA folder: problems.json, pid_splits.json, images/",
        )
        command.add_argument("--split", default="test", help="a split of pid_splits.json (default: test)")
        command.add_argument(
            "--out", required=True, type=Path, help="output folder; a rerun continues from its cache"
        )
        command.add_argument("--limit", type=positive_int, help="only the first N problems of the split")
        command.add_argument("--batch-size", type=positive_int, default=8, help="prompts per forward pass")
        command.add_argument("--device", help="default: cuda when available, else cpu")
        command.add_argument("--fp32", action="store_true", help=FP32_HELP)
        command.add_argument("--compile", action="store_true", help=COMPILE_HELP)
        command.set_defaults(handler=handler)


def _mmcot_problems(args: argparse.Namespace) -> list:
    """The split's problems (first --limit), checked before any model loads."""
    from kosmos.data.scienceqa import load_dataset
    from kosmos.eval.mmcot import check_problems

    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be >= 1")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ConfigError("--batch-size and --max-new-tokens must be >= 1")
    problems = load_dataset(args.data, args.split)[: args.limit]
    check_problems(problems, args.split)
    return problems


def _mmcot_backend(args: argparse.Namespace, problems: list, prompt):
    """The model's backend and its checkpoint's identity, once the prompts and --max-new-tokens are
    known to fit the model's positions (checked from its config, before the weights load)."""
    from kosmos.distributed import local_device
    from kosmos.eval.backend import ModelBackend, eval_config, load_for_eval
    from kosmos.eval.cache import checkpoint_identity
    from kosmos.eval.mmcot import check_room
    from kosmos.model import inference_dtype

    model_cfg, tokenizer = eval_config(args.checkpoint)
    check_room(problems, prompt, tokenizer, model_cfg, args.max_new_tokens)
    device = args.device or local_device()
    model, tokenizer, _ = load_for_eval(args.checkpoint, device, inference_dtype(device, args.fp32))
    configure_threads()
    return ModelBackend(model, tokenizer, args.batch_size, args.compile), checkpoint_identity(
        args.checkpoint, model
    )


def _mmcot_rationales(args: argparse.Namespace) -> int:
    from kosmos.eval.mmcot import generate_rationales, prompts_of, score_rationales, write_results

    problems = _mmcot_problems(args)
    backend, checkpoint = _mmcot_backend(args, problems, prompts_of("rationale"))
    records = generate_rationales(
        backend, problems, args.out, checkpoint, args.max_new_tokens, args.batch_size
    )
    results = {
        "stage": "rationale",
        "checkpoint": checkpoint.as_dict(),
        "split": args.split,
        "rationales": score_rationales(problems, [r["prediction"] for r in records]),
    }
    print(write_results(args.out, results))
    return 0


def _mmcot_answers(args: argparse.Namespace) -> int:
    from kosmos.eval.mmcot import (
        answer_problems,
        prompts_of,
        rationales_by_pid,
        score_answers,
        score_rationales,
        write_results,
    )

    problems = _mmcot_problems(args)
    if args.rationales is None:
        prompt = prompts_of("direct")
    else:  # every problem has its rationale, known before the model loads
        prompt = prompts_of("answer", rationales_by_pid(problems, args.rationales))
    backend, checkpoint = _mmcot_backend(args, problems, prompt)
    records = answer_problems(
        backend,
        problems,
        args.out,
        checkpoint,
        args.rationales,
        args.max_new_tokens,
        args.batch_size,
    )
    results = {
        "stage": "direct" if args.rationales is None else "answer",
        "checkpoint": checkpoint.as_dict(),
        "split": args.split,
        "answers": score_answers(records),
    }
    if args.rationales is not None:
        results["rationales"] = score_rationales(problems, [r["rationale"] for r in records])
    print(write_results(args.out, results))
    return 0
