"""``vlmtools tune``: choose the heads ACT or ZeroTuning edits on a model, and store them by its name.

vlmtools tune --method act                                  # llava-shapes, on the shapes world's val questions
vlmtools tune --method zerotuning --model qwen2vl-shapes --samples 32 --layers 4 5 6
vlmtools tune --method act --model /models/llava-1.5-7b-hf --vqa my_vqa.jsonl --images my_images/ --device cuda
vlmtools tune --method zerotuning --model /models/llava-1.5-7b-hf --pope coco_pope_random.json --images val2014/

The head search (``tuning.calibrate``) edits each candidate head alone on labelled prompts and keeps those that
beat the unedited model; the selection goes where ``ACT()`` / ``ZeroTuning()`` load it for this model (the
calibration folder: ``--directory``, else ``$PRUNING_CALIBRATION``, else ``calibration/`` in the vlmtools cache).
A zoo model calibrates on the shapes world's ``val`` questions (never ``test``); any other model needs labelled
data of its own kind (``--vqa``, ``--pope`` or ``--dataset``): heads chosen on shapes scenes would misfit it.
"""
from __future__ import annotations

from .args import at_least

SAMPLES = 64
"""Labelled prompts the search scores by default."""
METHODS = {"act": "ACT", "zerotuning": "ZeroTuning"}


def zoo_val_data(count: int):
    """The shapes world's first ``count`` val questions with their answers, as :class:`vlmtools.data.Data`."""
    from vlmtools.data import Data, Example
    from vlmtools_zoo import world

    return Data([Example(world.scene("val", scene).image, question.question, answers=(question.answer,),
                         key=f"val:{scene}") for scene, question in world.qa_items("val", count)])


def calibration_data(args):
    """The labelled data ``args`` names (read before the model loads), else the zoo's val questions; refuses a
    model that is no zoo model without data of its own, saying what to run."""
    import vlmtools_zoo as zoo
    from vlmtools.data import Data

    from . import bench

    sources = [f"--{name}" for name in ("vqa", "pope", "dataset") if getattr(args, name)]
    if len(sources) > 1:
        raise ValueError(f"tune calibrates on one data set at a time; got {' and '.join(sources)}")
    public = bench.read_data(args, {"vqa": args.samples, "pope": args.samples})
    if public:  # several --pope files: at most --samples of them all
        data = next(iter(public.tasks.values()))
        return Data(data.examples[:args.samples], data.files)
    if args.model not in zoo.MODELS:
        raise ValueError(f"{args.model} is no zoo model: calibrate it on labelled data of its own kind, e.g. "
                         f"vlmtools tune --method {args.method} --model {args.model} --vqa FILE --images DIR "
                         "(or --pope FILE --images DIR, or --dataset DIR); heads chosen on shapes scenes would "
                         "misfit it")
    return zoo_val_data(args.samples)


def tune_command(args) -> int:
    """Choose the heads of ACT or ZeroTuning on labelled prompts and store them by the model's name."""
    import tuning
    from vlmtools import wrap
    from vlmtools.cache import model_key

    from .inputs import load_vlm

    data = calibration_data(args)
    method = getattr(tuning, METHODS[args.method])()
    model, processor = load_vlm(args.model)
    vlm = wrap(model.to(args.device), processor)
    candidates = tuning.candidate_heads(vlm, args.layers, args.heads)  # a bad layer or head, before any work
    samples = tuning.labelled_samples(processor, data, vlm.model.device)
    selection = tuning.calibrate(vlm, method, samples, layers=args.layers, heads=args.heads, score=args.score,
                                 directory=args.directory)
    chosen = sum(len(heads) for heads in selection.heads.values())
    print(f"{METHODS[args.method]} on {model_key(vlm)}: {chosen} of {len(candidates)} candidate heads chosen "
          f"(unedited accuracy {selection.baseline:.3f} on {selection.samples} prompts, scored by {selection.score})"
          + (f", gamma {selection.gamma:g}" if selection.gamma is not None else ""))
    print(f"heads: {selection.heads}" if chosen else f"no head beat the unedited accuracy: {METHODS[args.method]}() "
          "refuses this selection (it would change nothing); try more --samples or other --layers")
    print(f"wrote {tuning.selection_path(model_key(vlm), args.method, args.directory)}")
    return 0


def register(subparsers) -> None:
    from . import bench

    parser = subparsers.add_parser("tune", help="choose and store the heads ACT or ZeroTuning edits",
                                   description=tune_command.__doc__ + " " + __doc__.split("\n\n", 2)[2])
    parser.add_argument("--method", required=True, choices=sorted(METHODS), help="the method whose heads are chosen")
    parser.add_argument("--model", default="llava-shapes",
                        help="llava-shapes (default), qwen2vl-shapes or a VLM folder")
    parser.add_argument("--samples", type=at_least(1), default=SAMPLES,
                        help="labelled prompts scored: zoo val questions, or the first of your data "
                             "(default: %(default)s)")
    parser.add_argument("--layers", type=int, nargs="+",
                        help="candidate decoder layers (default: 2 .. L-2, as the released ACT search)")
    parser.add_argument("--heads", type=int, nargs="+", help="candidate heads in each layer (default: all)")
    parser.add_argument("--score", choices=["first_token", "greedy"], default="first_token",
                        help="first_token: the argmax after one prefill is the answer's first token (the released "
                             "searches); greedy: the first word of a short greedy answer (default: %(default)s)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the model runs (default: %(default)s)")
    parser.add_argument("--directory", help="where the selection goes (default: $PRUNING_CALIBRATION, else "
                                            "calibration/ in $VLMTOOLS_CACHE or ~/.cache/vlmtools)")
    bench.add_data_arguments(parser, ("vqa", "pope"))
    parser.set_defaults(run=tune_command)
