"""Documents, prompts and scores of the KOSMOS-1 protocols as lmms-eval tasks (kosmos_caption,
kosmos_vqa): the data is in the `jsonl` layout of `kosmos eval` (docs/eval.md), read from the
folder lmms-eval runs in, and the scores are those `kosmos eval` computes, by the same code."""

from pathlib import Path

from PIL import Image

from kosmos.eval.metrics import compute_metrics


def evaluation_docs(dataset):
    """The rows of the evaluation split: `split` "test", or no `split` at all."""
    return dataset.filter(lambda doc: doc.get("split") in (None, "test"))


def doc_to_visual(doc):
    with Image.open(Path(doc["image"])) as image:
        return [image.convert("RGB")]


def caption_text(doc):
    return "An image of"


def vqa_text(doc):
    return f"Question: {doc['question']} Answer:"


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
