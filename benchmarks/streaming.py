"""StreamingLLM's sink cache on a long zoo chat: accuracy on the latest turn and peak KV-cache bytes against the
full cache and a window without sinks, at several window sizes, and the decode step against the full cache's.

The stream: ``--streams`` chats of ``--turns`` turns, each user turn one held-out scene's image and a question about
it (consecutive ``world.qa_items`` of the ``test`` split, so the question types take turns; the zoo models were
trained on single-image turns), through the processor's chat template as one multi-image conversation. Each turn
reaches the cache as one chunk (what the template adds: the previous answer's end, the user turn, the assistant
prompt); the model answers greedily (at most ``--max-new-tokens``, token by token through the cache) and its answer
stays in the chat as the assistant turn, as a chat application with a persistent cache does.

Scored on the latest turn's question, from turn ``--scored-from`` on (default: one past the largest window, so
that every window has dropped earlier turns): accuracy of the answer's first word (``vlmtools.chat.first_word``) and
the NLL of the reference answer's first token at the assistant prompt (teacher-forced; every zoo answer is one
SmolLM2 token but 'triangle', whose first token 'tri' names it alone). Baselines: each scored question asked alone
(single turn) and chance (one over the answers of its type). Caches: the full ``DynamicCache``, the sink cache
(``streaming.SinkCache``: the detector's sinks plus a window) and the same window without sinks, the window a
multiple (``--windows``) of the mean tokens a turn adds. Peak bytes: the most the cache holds between forward calls
(keys and values of every layer; a chunk's own keys are attended to in full within its forward).

Speed: one decode step (``--steps`` of them per round) on the last stream's caches, the sink cache's against the
full cache's at the same stream length (the full cache cropped back after each round), median of interleaved
rounds (``common.ratios``, process CPU time).

``--out`` gets the JSON (settings, every turn's row, the summaries, the ratios) and a picture beside it (``.png``);
``--write`` puts the section "StreamingLLM sink cache" into benchmarks/RESULTS.md.
Run: ``python benchmarks/streaming.py [--write]`` (the defaults are the recorded run's: about 40 minutes on a
loaded 2-core CPU; ``--streams 1`` for a quick look).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from vlmtools.chat import first_word

HERE = Path(__file__).resolve().parent
# this script shares the package's name: find the package first, then this folder's common.py
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]
from streaming import SinkCache
from vlmtools.kv_cache import kv_bytes

sys.path.insert(0, str(HERE))
from common import ratios, write_section

sys.path.remove(str(HERE))

RESULTS = HERE / "RESULTS.md"
SECTION = "StreamingLLM sink cache"


@dataclass(frozen=True)
class Turn:
    """One user turn of the stream: an image, a question about it, the reference answer and the question's type."""

    image: object
    question: str
    answer: str
    type: str


def zoo_turns(count: int, start: int = 0, split: str = "test") -> list[Turn]:
    """``count`` turns from the ``start``-th held-out question of ``world.qa_items`` on."""
    from vlmtools_zoo import world

    items = world.qa_items(split, start + count)[start:]
    return [Turn(world.scene(split, index).image, q.question, q.answer, q.type) for index, q in items]


def chance(kind: str) -> float:
    """One over the answers a question of type ``kind`` has in the zoo's world."""
    from vlmtools_zoo import world

    answers = {"existence": 2, "position": 2, "colour": len(world.COLOURS), "shape": len(world.SHAPES),
               "count": 5}  # 1 to 5 objects a scene
    return 1 / answers[kind]


class ChatStream:
    """A multi-image chat through the processor's chat template, turn by turn: each user turn becomes the chunk of
    tokens the template adds after everything already in the cache (the model's own answer tokens included)."""

    def __init__(self, processor):
        self.processor, self.messages, self.rendered = processor, [], ""

    def user(self, image, question: str) -> dict:
        """The inputs that extend the chat by a user turn with ``image`` and ``question`` and the assistant prompt.
        No attention mask: the processor's would cover the chunk alone, and one unpadded chat needs none (the model
        builds the causal mask from the cache)."""
        self.messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
        text = self.processor.apply_chat_template(self.messages, add_generation_prompt=True)
        if not text.startswith(self.rendered):
            raise ValueError("the chat template rewrites earlier turns when a turn is added; a stream needs one that "
                             "only appends")
        chunk, self.rendered = text[len(self.rendered):], text
        inputs = dict(self.processor(images=[image], text=chunk, return_tensors="pt"))
        del inputs["attention_mask"]
        return inputs

    def assistant(self, answer: str) -> None:
        """Keep the model's ``answer`` (already in the cache as its own tokens) as the assistant turn."""
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        self.rendered += answer


def answer_nll(logits: torch.Tensor, token: int) -> float:
    """The negative log-likelihood of ``token`` under next-token ``logits``."""
    return -torch.log_softmax(logits.float(), -1)[token].item()


def summary(rows: list[dict]) -> dict:
    """Accuracy, mean answer NLL and chance (mean over the questions of one over their type's answers) of ``rows``."""
    if not rows:
        raise ValueError("no scored turns: lower --scored-from or raise --turns")
    return {"accuracy": statistics.mean(r["predicted"] == r["answer"] for r in rows),
            "nll": statistics.mean(r["nll"] for r in rows),
            "chance": statistics.mean(chance(r["type"]) for r in rows), "n": len(rows)}


def held(cache) -> int:
    """Keys the cache holds now in its first layer."""
    return cache.layers[0].keys.shape[-2]


@torch.no_grad()
def run_stream(model, processor, turns: list[Turn], cache, max_new_tokens: int = 4) -> tuple[list[dict], int]:
    """Each turn's row (reference and predicted answer, answer NLL, tokens seen and held) and the peak bytes the
    cache held between forward calls, for the chat of ``turns`` through ``cache``."""
    stream, tokenizer = ChatStream(processor), processor.tokenizer
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    rows, peak, seen = [], 0, 0

    def forward(inputs):
        nonlocal peak, seen
        logits = model(**inputs, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        peak, seen = max(peak, kv_bytes(cache)), seen + inputs["input_ids"].shape[1]
        return logits

    for index, turn in enumerate(turns):
        logits = forward(stream.user(turn.image, turn.question))
        nll = answer_nll(logits, tokenizer(turn.answer, add_special_tokens=False).input_ids[0])
        context, kept = seen, held(cache)
        answer = []
        while len(answer) < max_new_tokens and (token := int(logits.argmax())) not in stops:
            answer.append(token)
            logits = forward({"input_ids": torch.tensor([[token]])})
        text = tokenizer.decode(answer, skip_special_tokens=True)
        stream.assistant(text)
        rows.append({"turn": index, "type": turn.type, "answer": turn.answer, "predicted": first_word(text),
                     "nll": nll, "context": context, "held": kept})
    return rows, peak


def plot(summaries: dict, full: dict, single: dict, windows: list[int], path: Path) -> None:
    """Accuracy, answer NLL and peak KV-cache bytes against the window, sink cache and window alone, the full cache
    (and single-turn accuracy, chance) as lines across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 3, figsize=(14, 4.2))
    for (key, label), axes in zip((("accuracy", "accuracy on the latest turn"), ("nll", "answer NLL (nats)"),
                                   ("peak", "peak KV-cache MiB")), panels):
        scale = 2 ** -20 if key == "peak" else 1
        for name, style in (("sink", "o-"), ("window", "s--")):
            axes.plot(windows, [summaries[f"{name} {w}"][key] * scale for w in windows], style, label=name +
                      (" cache" if name == "sink" else " alone (k = 0)"))
        axes.axhline(full[key] * scale, color="k", label="full cache")
        if key == "accuracy":
            axes.axhline(single["accuracy"], color="g", linestyle=":", label="single turn")
            axes.axhline(full["chance"], color="grey", linestyle="-.", label="chance")
        axes.set_xscale("log", base=2)
        axes.set_xticks(windows, labels=[str(w) for w in windows])
        axes.set_xlabel("window (tokens)")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    panels[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def table(summaries: dict, k: int) -> str:
    lines = ["| cache | window (tokens) | accuracy | answer NLL | peak KV bytes | of the full cache's |",
             "|---|---|---|---|---|---|"]
    full = summaries["full"]["peak"]
    for name, s in summaries.items():
        kind, _, window = name.partition(" ")
        label = {"full": "full (DynamicCache)", "sink": f"sink cache (k = {k})", "window": "window alone (k = 0)",
                 "single": "each question alone"}[kind]
        lines.append(f"| {label} | {window or '-'} | {s['accuracy']:.3f} | {s['nll']:.3f} | "
                     + (f"{s['peak']:,} | {s['peak'] / full:.2f} |" if "peak" in s else "- | - |"))
    return "\n".join(lines)


def code_version() -> str:
    """The commit this runs at, and the library's sink cache by its blob where streaming/ has uncommitted changes."""
    def git(*words):
        return subprocess.run(["git", *words], capture_output=True, text=True, cwd=HERE, check=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if git("status", "--porcelain", "--", "../streaming"):
        commit += " with streaming/ uncommitted (cache.py blob " + git("hash-object", "../streaming/cache.py")[:10] + ")"
    return commit


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llava-shapes", choices=["llava-shapes", "qwen2vl-shapes"])
    parser.add_argument("--streams", type=int, default=6, help="chats, each on the next held-out questions")
    parser.add_argument("--turns", type=int, default=14, help="turns a chat")
    parser.add_argument("--windows", type=float, nargs="+", default=[0.5, 1, 2, 4],
                        help="windows in turns' worth of tokens (the full cache's mean tokens a turn)")
    parser.add_argument("--scored-from", type=int, help="first turn scored (default: one past the largest window)")
    parser.add_argument("--criterion", default="positional", help="the detector criterion k is read from")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="decode steps a timing round")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("streaming-bench.json"), help="the JSON; the picture: .png")
    parser.add_argument("--write", action="store_true", help=f"write the section {SECTION!r} of RESULTS.md")
    args = parser.parse_args()
    if min(args.streams, args.turns, args.max_new_tokens, args.steps, args.repeats) < 1 or min(args.windows) <= 0:
        parser.error("--streams, --turns, --max-new-tokens, --steps, --repeats and --windows must be positive")
    scored_from = math.ceil(max(args.windows)) + 1 if args.scored_from is None else args.scored_from
    torch.set_num_threads(args.threads)
    started = time.time()
    commit = code_version()
    from transformers import DynamicCache

    import vlmtools
    import vlmtools_zoo as zoo
    from vlmtools.adapters.base import UnsupportedModel

    model, processor = zoo.load(args.model)
    vlm = vlmtools.wrap(model, processor)
    try:
        SinkCache(vlm, window=1, sinks=0)  # a family the cache refuses (M-RoPE) fails before any run
    except UnsupportedModel as refusal:
        parser.error(f"{args.model}: {refusal}")
    streams = [zoo_turns(args.turns, s * args.turns) for s in range(args.streams)]
    runs, caches = {}, {}

    def measure(name: str, make_cache) -> dict:
        rows, peak, lengths = [], 0, []
        for s, turns in enumerate(streams):
            caches[name] = make_cache()
            part, part_peak = run_stream(model, processor, turns, caches[name], args.max_new_tokens)
            rows += [{"stream": s, **row} for row in part]
            peak, lengths = max(peak, part_peak), lengths + [caches[name].get_seq_length()]
        runs[name] = {"rows": rows, "peak": peak, "lengths": lengths}
        result = {**summary([r for r in rows if r["turn"] >= scored_from]), "peak": peak}
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in result.items()), f"({time.time() - started:.0f} s)", flush=True)
        return result

    summaries = {"full": measure("full", lambda: DynamicCache(config=model.config))}
    tokens = statistics.mean(runs["full"]["lengths"]) / args.turns
    windows = [round(m * tokens) for m in args.windows]
    first = ChatStream(processor).user(streams[0][0].image, streams[0][0].question)
    k = SinkCache.detect(vlm, first, window=1, criterion=args.criterion).sinks
    print(f"tokens a turn: {tokens:.1f}; windows {windows}; k = {k} ({args.criterion})", flush=True)
    for window in windows:
        summaries[f"sink {window}"] = measure(f"sink {window}", partial(SinkCache, vlm, window, k))
        summaries[f"window {window}"] = measure(f"window {window}", partial(SinkCache, vlm, window, 0))
    single_rows = []
    for turns in streams:  # each scored question alone, on a fresh cache
        for turn in turns[scored_from:]:
            single_rows += run_stream(model, processor, [turn], DynamicCache(config=model.config))[0]
    summaries["single"] = summary(single_rows)
    print(f"single: accuracy {summaries['single']['accuracy']:.3f}, nll {summaries['single']['nll']:.3f}", flush=True)

    length = caches["full"].get_seq_length()
    token = torch.tensor([[processor.tokenizer.eos_token_id]])

    def decode(name):
        cache = caches[name]

        def step():
            for _ in range(args.steps):
                model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
            if name == "full":
                cache.crop(-args.steps)

        return step

    base, speed = ratios(decode("full"), {f"sink {w}": decode(f"sink {w}") for w in windows}, repeats=args.repeats,
                         clock=time.process_time)
    speed = {f"sink_decode_ratio_w{w}": speed[f"sink {w}"] for w in windows}
    print(f"full_decode_step_s: {base / args.steps:.4f} (stream length {length})")
    for name, value in speed.items():
        print(f"{name}: {value:.4f}")

    command = "python benchmarks/streaming.py " + " ".join(sys.argv[1:])
    settings = {"model": args.model, "streams": args.streams, "turns": args.turns, "tokens_a_turn": tokens,
                "windows": windows, "k": k, "criterion": args.criterion, "scored_from": scored_from,
                "max_new_tokens": args.max_new_tokens, "threads": args.threads, "commit": commit, "command": command}
    full = summaries["full"]
    text = [
        f"## {SECTION}",
        "",
        (f"`{command}` at commit `{commit}`, on this 2-core CPU shared with other jobs (load average "
         f"{os.getloadavg()[0]:.1f} at the end; {args.threads} torch thread(s), fp32), {time.time() - started:.0f} s."),
        "",
        (f"{args.model}: {args.streams} chats of {args.turns} turns (one held-out `test` scene and question a turn, "
         f"{tokens:.0f} tokens a turn on average with the answer; {length} tokens in the last chat), answered "
         f"greedily turn by turn through the cache; scored from turn {scored_from} on "
         f"({full['n']} questions; chance {full['chance']:.3f}). Sink cache: the first k = {k} tokens "
         f"(detector criterion `{args.criterion}`) plus the window; window alone: k = 0; windows of "
         + ", ".join(f"{m:g}" for m in args.windows) + " turns' worth of tokens."),
        "",
        table(summaries, k),
        "",
        f"Decode step at a stream of {length} tokens: full cache {base / args.steps:.4f} s (process CPU time); "
        + ", ".join(f"sink cache window {w}: ratio {speed[f'sink_decode_ratio_w{w}']:.3f}" for w in windows)
        + " (median of interleaved rounds).",
    ]
    print("\n".join(text))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "summaries": summaries, "decode": {
        "full_step_s": base / args.steps, "stream_length": length, **speed}, "section": text, "runs": runs,
        "single_rows": single_rows}, indent=1))
    picture = args.out.with_suffix(".png")
    plot(summaries, summaries["full"], summaries["single"], windows, picture)
    print(f"wrote {args.out} and {picture}")
    if args.write:
        write_section(RESULTS, SECTION, "\n".join(text))


if __name__ == "__main__":
    main()
