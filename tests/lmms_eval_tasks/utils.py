"""The vlmtools_pope task's functions: the image under images/, the question as written (the prompt
hallucination-bench gives), and POPE's scores with the POPE authors' answer rule (hallucination.metrics)."""
from pathlib import Path

from PIL import Image

IMAGES = Path("images")
"""The image folder, relative to the folder lmms-eval runs in (where pope.jsonl is)."""


def doc_to_visual(doc):
    with Image.open(IMAGES / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["text"]


def process_results(doc, results):
    answer = {"answer": results[0], "label": doc["label"]}
    return {"pope_accuracy": answer, "pope_f1": answer}


def _pope(items):
    from hallucination.metrics import pope

    return pope([item["answer"] for item in items], [item["label"] for item in items])


def accuracy(items):
    return _pope(items)["accuracy"]


def f1(items):
    return _pope(items)["f1"]
