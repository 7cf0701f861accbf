"""What the VLM bench commands (``prune-bench``, ``hallucination-bench``) share: their run options,
loading the model into each process, and the result: a Markdown table printed and one JSON file
holding the settings the run used, the results and how it ran. Sharding: :mod:`vlmtools_app.shard`.
"""
from __future__ import annotations

import argparse
import ast
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import shard
from .args import at_least

NOT_SETTINGS = ("run", "command", "out")
"""Parsed arguments that are not settings of the evaluation (where the result goes)."""


def add_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--model", default="llava-shapes",
                        help="llava-shapes (default) or a local Hugging Face VLM folder")
    parser.add_argument("--batch", type=at_least(1), default=16,
                        help="prompts per generate call, left-padded (a batch is never split across processes)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: every process runs on its own GPU (LOCAL_RANK)")
    parser.add_argument("--threads", type=at_least(1), help="torch CPU threads per process (default: torch's choice)")
    parser.add_argument("--out", default=out, help="the JSON file written: settings, results, processes, seconds")


DATA_HELP = {
    "pope": "a POPE question file: one JSON object a line with question_id, image, text and label (yes / no), "
            "as POPE releases them, any split (named by random / popular / adversarial in the file name, else "
            "by its stem); repeat the option for several files; with --images",
    "vqa": "a VQA file: one JSON object a line, {image, question, answer} or {image, question, answers: [...]}, "
           "scored with the VQA accuracy (min(humans who gave the answer / 3, 1), over the ten nine-answer "
           "subsets when there are ten) after the official answer normalisation; with --images",
    "chair": "COCO captions json (captions_val2014.json): the images captioned for CHAIR, in its order; with "
             "--coco-instances and --images",
}
TASK_COLUMNS = {"pope": "label", "vqa": "answer or answers", "chair": "objects"}


@dataclass
class Public:
    """The data read from the files and folders the options name, by task; ``vocabulary``: the object names
    CHAIR looks for (the COCO instances' categories, or the objects of a dataset's rows)."""

    tasks: dict = field(default_factory=dict)
    vocabulary: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def record(self) -> dict:
        """Per task, the files read (path, sha256) and the number of items read."""
        return {task: data.record() for task, data in self.tasks.items()}


def add_data_arguments(parser: argparse.ArgumentParser, tasks: tuple[str, ...]) -> None:
    """Options naming public data for ``tasks`` (``pope``, ``vqa``, ``chair``); without them a bench runs on
    the shapes world's held-out scenes."""
    from vlmtools.data import COLUMNS

    group = parser.add_argument_group(
        "your data (instead of the shapes world's held-out scenes)",
        "Files in public formats, or a Hugging Face dataset saved with save_to_disk. A bad line, a missing "
        "image, a label that is not yes / no, an image id the annotations lack or a missing column is refused "
        "before the model loads, naming the file and line (or column); nothing is written. The JSON records "
        "each file read (path, sha256) and the number of items.")
    if "pope" in tasks:
        group.add_argument("--pope", action="append", metavar="FILE.jsonl", help=DATA_HELP["pope"])
    if "vqa" in tasks:
        group.add_argument("--vqa", metavar="FILE.jsonl", help=DATA_HELP["vqa"])
    if "chair" in tasks:
        group.add_argument("--coco-captions", metavar="captions.json", help=DATA_HELP["chair"])
        group.add_argument("--coco-instances", metavar="instances.json",
                           help="COCO instances json (instances_val2014.json): the objects in each captioned image")
    group.add_argument("--images", metavar="DIR", help="the folder the image names of those files are under "
                                                       "(with --dataset: of an image column holding paths)")
    group.add_argument("--dataset", metavar="DIR",
                       help="a Hugging Face dataset saved with save_to_disk (pip install datasets), columns: image "
                            "(an image, or a path), question, and per task " + "; ".join(
                                f"{task}: {TASK_COLUMNS[task]}" for task in tasks) + " (POPE: category, the split, "
                            "if present)")
    group.add_argument("--dataset-task", choices=tasks,
                       help="what --dataset holds (default: by its columns, " + ", ".join(
                           f"{TASK_COLUMNS[task]}: {task}" for task in tasks) + ")")
    group.add_argument("--dataset-split", help="the split of a saved DatasetDict (needed when it holds several)")
    group.add_argument("--columns", metavar="NAME=COLUMN[,...]",
                       help=f"dataset columns of other names, e.g. label=answer,question=text (names: {', '.join(COLUMNS)})")


def read_data(args: argparse.Namespace, limits: dict[str, int | None]) -> Public:
    """The data ``args`` names (empty: the shapes world), the first ``limits[task]`` items of each file or
    dataset. Refuses inconsistent options and bad data with a ValueError / FileNotFoundError."""
    from vlmtools.data import Data, read_dataset, read_pope, read_vqa

    given = {"pope": getattr(args, "pope", None), "vqa": getattr(args, "vqa", None),
             "chair": getattr(args, "coco_captions", None)}
    if getattr(args, "coco_instances", None) and not given["chair"]:
        raise ValueError("--coco-instances goes with --coco-captions")
    if given["chair"] and not args.coco_instances:
        raise ValueError("--coco-captions needs --coco-instances (the objects in each image)")
    for option in ("dataset_task", "dataset_split", "columns"):
        if getattr(args, option) and not args.dataset:
            raise ValueError(f"--{option.replace('_', '-')} goes with --dataset")
    if not any(given.values()) and not args.dataset:
        if args.images:
            raise ValueError("--images goes with " + ", ".join(
                f"--{o}" for o in ("pope", "vqa", "coco-captions") if hasattr(args, o.replace("-", "_")))
                + " or --dataset")
        return Public()
    if any(given.values()) and not args.images:
        option = next(f"--{'coco-captions' if t == 'chair' else t}" for t, v in given.items() if v)
        raise ValueError(f"{option} needs --images DIR, the folder its image names are under")
    public = Public()
    for task, limit in limits.items():
        if limit == 0 and (given.get(task) or args.dataset):
            raise ValueError(f"{'--captions' if task == 'chair' else 'a limit of'} 0 leaves no {task} item to read")
    if args.dataset:
        task = args.dataset_task or dataset_task(args.dataset, args.dataset_split, parse_columns(args.columns),
                                                 tuple(t for t in given if hasattr(args, _option(t))))
        if given[task]:
            raise ValueError(f"{task} data from both --{_option(task).replace('_', '-')} and --dataset: give one")
        public.tasks[task] = read_dataset(args.dataset, task, args.images, limits.get(task), args.dataset_split,
                                          parse_columns(args.columns))
        if task == "chair":
            public.vocabulary = sorted({o for e in public.tasks[task].examples for o in e.objects})
    if given["pope"]:
        public.tasks["pope"] = Data.joined([read_pope(path, args.images, limits.get("pope")) for path in given["pope"]])
    if given["vqa"]:
        public.tasks["vqa"] = read_vqa(given["vqa"], args.images, limits.get("vqa"))
    if given["chair"]:
        from hallucination.coco import read_chair_coco

        public.tasks["chair"], public.vocabulary = read_chair_coco(args.coco_captions, args.coco_instances,
                                                                   args.images, limits.get("chair"))
    return public


def _option(task: str) -> str:
    return "coco_captions" if task == "chair" else task


def parse_columns(text: str | None) -> dict[str, str]:
    """``--columns`` (``label=answer,question=text``) as {name: column}."""
    from vlmtools.data import COLUMNS

    out = {}
    for item in (text or "").split(",") if text else []:
        name, sep, column = item.partition("=")
        if not sep or not column or name not in COLUMNS:
            raise ValueError(f"--columns: {item!r} is no NAME=COLUMN with NAME one of {', '.join(COLUMNS)}")
        out[name] = column
    return out


def dataset_task(folder: str, split: str | None, columns: dict[str, str], tasks: tuple[str, ...]) -> str:
    """The task a saved dataset holds, by its columns: label -> pope, answer / answers -> vqa, objects ->
    chair (among ``tasks``); a ValueError when none or several fit."""
    from vlmtools.data import load_dataset

    present = set(load_dataset(folder, split).column_names)
    names = {"pope": ["label"], "vqa": ["answer", "answers"], "chair": ["objects"]}
    fits = [t for t in tasks if any(columns.get(n, n) in present for n in names[t])]
    if len(fits) != 1:
        found = "none" if not fits else " and ".join(fits)
        raise ValueError(f"{folder}: its columns ({', '.join(sorted(present))}) fit {found} of "
                         + ", ".join(f"{t} ({TASK_COLUMNS[t]})" for t in tasks) + ": say which with --dataset-task")
    return fits[0]


def load(args: argparse.Namespace):
    """The wrapped model of ``--model`` on this process's device, with ``--threads`` applied."""
    import torch

    from vlmtools import wrap
    from .inputs import load_vlm

    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_vlm(args.model)
    return wrap(model.to(shard.device(args.device)), processor)


def finish(args: argparse.Namespace, results: dict, table: str, started: float, timing: dict | None = None) -> None:
    """On rank 0: print ``table`` and write ``--out`` (settings, results, and how it ran: processes, seconds and
    ``timing``, measurements of this run such as speed-ups, which another run or machine would not repeat)."""
    if not shard.is_main():
        return
    settings = {key: value for key, value in vars(args).items() if key not in NOT_SETTINGS}
    record = {"command": args.command, "settings": settings, "results": results,
              "run": {"processes": shard.world()[1], "seconds": round(time.time() - started, 1), **(timing or {})}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(table)
    print(f"wrote {args.out}")


def chosen(names: str, available, what: str) -> list[str]:
    """The comma-separated ``names``, each one of ``available`` (else a ValueError listing them)."""
    picked = names.split(",")
    unknown = set(picked) - set(available)
    if unknown:
        raise ValueError(f"unknown {what} {sorted(unknown)}; available: {', '.join(available)}")
    return picked


def entries(text: str, available, what: str) -> list[tuple[str, str, dict]]:
    """Comma-separated entries ``NAME[:KEY=VALUE...]`` (``gift:alpha=2.5``, ``sparsevlm:votes=previous:recycle=0``)
    as (entry, name, keyword settings); ``what`` names the option in errors (``methods``, ``hosts``)."""
    listed = text.split(",")
    names = chosen(",".join(e.split(":")[0] for e in listed), available, what)
    if len(set(listed)) < len(listed):
        raise ValueError(f"--{what} lists an entry twice: {text}")
    out = []
    for entry, name in zip(listed, names):
        settings = {}
        for item in entry.split(":")[1:]:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{entry!r}: settings are KEY=VALUE, got {item!r}")
            settings[key] = literal(value)
        out.append((entry, name, settings))
    return out


def literal(value: str):
    """A setting's value: a Python literal (``2.5``, ``False``, ``(2, 3)``) or else the word itself."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
