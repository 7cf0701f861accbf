"""benchmarks/full.sh (the GPU run of every ``--full`` benchmark): each step calls a benchmark that exists with
flags it declares, over the families and implementations asked for, and a failing step is logged without
stopping the ones after it. The interpreter is a recorder, so nothing runs here."""
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_step_calls_a_benchmark_with_flags_it_declares(tmp_path):
    calls = tmp_path / "calls"
    recorder = tmp_path / "python"
    recorder.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1" = benchmarks/sinks.py ] && exit 3\nexit 0\n')
    recorder.chmod(0o755)
    env = {**os.environ, "PYTHON": str(recorder), "FAMILIES": "llava qwen3_5", "ATTN": "sdpa eager"}
    subprocess.run([str(ROOT / "benchmarks/full.sh"), str(tmp_path / "logs")], env=env, check=True,
                   capture_output=True)

    summary = (tmp_path / "logs/summary.txt").read_text().splitlines()
    names = [re.match(r"(\S+): exit (\d+)", line).groups() for line in summary]
    grid = [(f"{kind}_{family}_{attn}", "0") for attn in ("sdpa", "eager") for family in ("llava", "qwen3_5")
            for kind in ("seam", "pruning")]
    assert names == [("cuda_tests", "0"), *grid, ("sinks", "3"), ("hallucination", "0"), ("dit_memory", "0")]

    for call in calls.read_text().splitlines():
        script, *args = call.split()
        if script == "-m":
            assert args[:2] == ["pytest", "-q"] and (ROOT / args[2]).is_file()
            continue
        source = (ROOT / script).read_text()
        assert "--full" in args
        for flag in (a for a in args if a.startswith("--")):
            assert f'"{flag}"' in source, f"{script} declares no {flag}"
