"""``vlmtools sinks``: load a model, run the detector on one image and question, show it.

vlmtools sinks                                   # llava-shapes on a held-out zoo scene
vlmtools sinks photo.jpg --question "What is on the table?" --model /models/llava-1.5-7b-hf --out out/
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from vlmtools.chat import chat_inputs

from .inputs import load_vlm
from vlmtools.sinks.detector import DEFAULT, SinkDetector
from vlmtools.sinks.report import SinkReport


def run_sinks_cli(model: str, image, question: str, out_dir, criteria: Iterable[str] = DEFAULT) -> SinkReport:
    """Print the sink table of one prompt; write ``sinks.png`` and ``sinks.json`` to ``out_dir``.

    ``image`` is a path or a PIL image; the prompt is the processor's chat template
    with the image first, as LLaVA-1.5 was trained.
    """
    from PIL import Image

    from vlmtools import wrap

    vlm_model, processor = load_vlm(model)
    picture = Image.open(image).convert("RGB") if isinstance(image, (str, Path)) else image
    inputs = chat_inputs(processor, [picture], [question])
    report = SinkDetector(criteria).detect(wrap(vlm_model, processor), inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.plot(out / "sinks.png")
    (out / "sinks.json").write_text(report.to_json())
    print(report.table())
    print(f"wrote {out / 'sinks.png'} and {out / 'sinks.json'}")
    return report


def sinks_command(args) -> int:
    """Sinks of one prompt, by every chosen criterion: a table on stdout, sinks.png and sinks.json in --out."""
    from vlmtools_zoo import scene

    image = args.image or scene("test", 0).image
    run_sinks_cli(args.model, image, args.question, args.out, args.criteria)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sinks", help="attention sinks of one image and question: table and heatmap", description=sinks_command.__doc__
    )
    parser.add_argument("image", nargs="?", help="an image file (default: a held-out zoo scene)")
    parser.add_argument("--question", default="What is in the picture?", help="the question asked with the image")
    parser.add_argument("--model", default="llava-shapes", help="llava-shapes (default) or a VLM folder")
    parser.add_argument("--criteria", nargs="+", default=list(DEFAULT), choices=DEFAULT,
                        help="sink criteria to evaluate (default: all that apply to a VLM)")
    parser.add_argument("--out", default="sinks-out", help="folder for sinks.png and sinks.json")
    parser.set_defaults(run=sinks_command)
