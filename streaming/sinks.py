"""How many first tokens a sink cache keeps, and which lasting sinks, read from the shared detector's report."""
from __future__ import annotations

from vlmtools.sinks import SinkReport


def leading_sinks(report: SinkReport, criterion: str | None = None) -> int:
    """``k``: the longest run of consecutive tokens from a sample's first real token that ``criterion`` calls
    sinks (in any layer or head), over the samples. StreamingLLM keeps the first tokens as one run; with the
    ``positional`` criterion this is its ``k``."""
    criterion = _criterion(report, criterion)
    runs = []
    for b, found in enumerate(_found(report, criterion)):
        first, run = _first_real(report, b), 0
        while first + run in found:
            run += 1
        runs.append(run)
    if not any(runs):
        raise ValueError(f"the sink report's {criterion!r} criterion found no sink at any sample's first token; "
                         "pass sinks=k or another criterion")
    return max(runs)


def lasting_sinks(report: SinkReport, criterion: str | None = None) -> list[list[int]]:
    """Per sample, the prompt positions ``criterion`` calls sinks outside the leading run (secondary sinks,
    visual sinks): kept besides the first tokens for the whole stream when a cache asks for lasting sinks."""
    criterion = _criterion(report, criterion)
    k = leading_sinks(report, criterion)
    return [sorted(t for t in found if t >= _first_real(report, b) + k)
            for b, found in enumerate(_found(report, criterion))]


def _criterion(report: SinkReport, criterion: str | None) -> str:
    names = [s["criterion"] for s in report.settings]
    if criterion is None:
        if len(names) != 1:
            raise ValueError(f"the sink report holds criteria {names}: name the one the cache reads (criterion=...)")
        return names[0]
    if criterion not in names:
        raise ValueError(f"the sink report holds no {criterion!r} findings (it ran {names})")
    return criterion


def _found(report: SinkReport, criterion: str) -> list[set[int]]:
    found: list[set[int]] = [set() for _ in report.tokens]
    for f in report.sinks(criterion):
        found[f.sample].add(f.token)
    return found


def _first_real(report: SinkReport, sample: int) -> int:
    roles = [t["role"] for t in report.tokens[sample]]
    return next((i for i, role in enumerate(roles) if role != "padding"), len(roles))
