"""Documents, prompts and scores of the KOSMOS-1 protocols as lmms-eval tasks (kosmos_caption,
kosmos_vqa): the data is in the `jsonl` layout of `kosmos eval` (docs/eval.md), read from the
folder lmms-eval runs in, and the scores are those `kosmos eval` computes, by the same code.

Few-shot: `lmms_eval_specific_kwargs` `shots` (and `seed`) put that many demonstrations before each
query, drawn from the file's rows with `split` "demo" by the random scheme of `kosmos eval --demos
random` (the same draw for the same seed), each laid out as the query with its answer and ended by
`</s>`; their images come first in `doc_to_visual`, in the same order."""

import functools
import json
from collections import Counter
from pathlib import Path

from PIL import Image

from kosmos.eval.datasets import Sample
from kosmos.eval.demos import RandomDemos
from kosmos.eval.metrics import compute_metrics

CAPTIONS, QUESTIONS = "captioning.jsonl", "vqa.jsonl"


@functools.cache
def _pool(annotations: str) -> list[dict]:
    rows = [json.loads(line) for line in Path(annotations).read_text().splitlines() if line.strip()]
    return [row for row in rows if row.get("split") == "demo"]


def _demonstrations(doc, annotations: str, options) -> list[dict]:
    shots = int((options or {}).get("shots", 0))
    if not shots:
        return []
    pool = _pool(str(Path(annotations).resolve()))  # read from where lmms-eval runs
    selector = RandomDemos([Sample(str(row["id"])) for row in pool], int(options.get("seed", 0)))
    return [pool[i] for i in selector.select(Sample(str(doc["id"])), shots)]


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
