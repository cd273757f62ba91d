"""Documents, prompts and scores of the KOSMOS-1 protocols as lmms-eval tasks (kosmos_caption,
kosmos_vqa): the data is in the `jsonl` layout of `kosmos eval` (docs/eval.md), read from the
folder lmms-eval runs in, and the scores are those `kosmos eval` computes, by the same code.

Few-shot: `lmms_eval_specific_kwargs` `shots` (and `seed`) put that many demonstrations before each
query, chosen from the file's rows with `split` "demo" by the scheme `demos` names (`random`, `rices`
or `stratified`) with the selection code of `kosmos eval --demos` (the same demonstrations for the
same data and options), each laid out as the query with its answer and ended by `</s>`; their images
come first in `doc_to_visual`, in the same order. The retrieval schemes embed the pool and the
evaluation rows with the open_clip model `retrieval_clip` from the local weights file
`retrieval_weights`, as `kosmos eval --retrieval-clip/--retrieval-weights` does."""

import functools
import json
from collections import Counter
from pathlib import Path

from PIL import Image

from kosmos.config import ConfigError
from kosmos.distributed import local_device
from kosmos.eval.cli import RETRIEVAL_CLIP
from kosmos.eval.datasets import LOADERS, Sample
from kosmos.eval.demos import ClipEmbedder, build_selector, check_demos
from kosmos.eval.metrics import compute_metrics
from kosmos.eval.tasks import SplitConfig

CAPTIONS, QUESTIONS = "captioning.jsonl", "vqa.jsonl"


@functools.cache
def _embedder(model_name: str, weights: str) -> ClipEmbedder:
    return ClipEmbedder(model_name, weights, local_device())  # the device `kosmos eval` picks


@functools.cache
def _selection(annotations: str, shots: int, scheme: str, seed: int, clip: str, weights: str | None):
    """The demo rows and the selector `kosmos eval` builds for this file: its pool is the rows with
    `split` "demo", its queries the evaluation rows (as `evaluation_docs` keeps them), in file order."""
    path = Path(annotations)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    every_row = LOADERS["jsonl"](SplitConfig(annotations=path.name), path.parent, str(path))
    samples = {s.id: s for s in every_row}
    pool_rows = [row for row in rows if row.get("split") == "demo"]
    pool = [samples[str(row["id"])] for row in pool_rows]
    queries = [samples[str(row["id"])] for row in rows if row.get("split") in (None, "test")]
    where = f"{annotations} (lmms_eval_specific_kwargs demos: {scheme}, shots: {shots})"
    check_demos(scheme, pool, queries, shots, where)
    if scheme != "random" and weights is None:
        raise ConfigError(f"{where}: needs retrieval_weights, a local open_clip checkpoint file")
    try:
        embedder = _embedder(clip, weights) if scheme != "random" else None
        return pool_rows, build_selector(scheme, pool, queries, embedder, seed=seed)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def _demonstrations(doc, annotations: str, options) -> list[dict]:
    options = options or {}
    shots = int(options.get("shots", 0))
    if not shots:
        return []
    pool_rows, selector = _selection(
        str(Path(annotations).resolve()),  # read from where lmms-eval runs
        shots,
        str(options.get("demos", "random")),
        int(options.get("seed", 0)),
        str(options.get("retrieval_clip", RETRIEVAL_CLIP)),
        options.get("retrieval_weights"),
    )
    return [pool_rows[i] for i in selector.select(Sample(str(doc["id"])), shots)]


def _answer(row) -> str:
    """What a demonstration shows: its most common reference, as `kosmos eval` shows it."""
    return Counter(row.get("captions") or row["answers"]).most_common(1)[0][0]


def _load(path) -> Image.Image:
    with Image.open(Path(path)) as image:
        return image.convert("RGB")


def evaluation_docs(dataset):
    """The rows of the evaluation split: `split` "test", or no `split` at all."""
    return dataset.filter(lambda doc: doc.get("split") in (None, "test"))


def _visuals(doc, annotations, options):
    return [_load(row["image"]) for row in _demonstrations(doc, annotations, options)] + [_load(doc["image"])]


def caption_visual(doc, lmms_eval_specific_kwargs=None):
    return _visuals(doc, CAPTIONS, lmms_eval_specific_kwargs)


def vqa_visual(doc, lmms_eval_specific_kwargs=None):
    return _visuals(doc, QUESTIONS, lmms_eval_specific_kwargs)


def _with_demonstrations(doc, annotations, options, query) -> str:
    demos = _demonstrations(doc, annotations, options)
    if not demos:
        return query(doc)
    shown = "".join(f"<image>{query(row)} {_answer(row)}</s>" for row in demos)
    return f"{shown}<image>{query(doc)}"


def _caption_query(doc) -> str:
    return "An image of"


def _vqa_query(doc) -> str:
    return f"Question: {doc['question']} Answer:"


def caption_text(doc, lmms_eval_specific_kwargs=None):
    return _with_demonstrations(doc, CAPTIONS, lmms_eval_specific_kwargs, _caption_query)


def vqa_text(doc, lmms_eval_specific_kwargs=None):
    return _with_demonstrations(doc, QUESTIONS, lmms_eval_specific_kwargs, _vqa_query)


def caption_results(doc, results):
    record = {"prediction": results[0], "references": list(doc["captions"])}
    return {"cider": record, "rouge_l": record}


def vqa_results(doc, results):
    [result], _ = compute_metrics(
        ["vqa_accuracy"], [{"prediction": results[0], "references": list(doc["answers"])}]
    )
    return {"vqa_accuracy": result.value}


def _caption_metric(name, records):
    [result], _ = compute_metrics([name], records)
    return result.value


def cider(records):
    return _caption_metric("cider", records)


def rouge_l(records):
    return _caption_metric("rouge_l", records)
