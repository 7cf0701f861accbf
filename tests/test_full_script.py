"""benchmarks/full.sh (the GPU run of every ``--full`` benchmark): each step calls a benchmark that exists with
flags it declares, over the families and implementations asked for, and a failing step is logged without
stopping the ones after it (the interpreter is a recorder, so nothing runs here); and each ``--full`` benchmark
refuses, in one line with exit status 2, what a machine without a GPU or without FlashAttention cannot run."""
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


GPU = "--full needs a GPU (CUDA), and none is visible"


@pytest.mark.parametrize("command, error", [
    ("seam.py --full", GPU),
    ("seam.py --attn flash_attention_2", "--attn flash_attention_2 needs a GPU and FlashAttention 2's package"),
    ("pruning.py --full --family qwen3_vl", GPU),
    ("pruning.py --attn flash_attention_3", "--attn flash_attention_3 needs a GPU and FlashAttention 3's package"),
    ("sinks.py --full", GPU),
    ("hallucination.py --full", GPU),
    ("dit_memory.py --family all --full", GPU),
])
def test_a_full_benchmark_refuses_a_machine_without_a_gpu_in_one_line(command, error, monkeypatch, capsys):
    script, *args = command.split()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.setattr(sys, "path", [str(ROOT / "benchmarks"), *sys.path])  # as when run as a script
    try:
        with pytest.raises(SystemExit) as exit:
            runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
    finally:
        sys.modules.pop("common", None)
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"{script}: error: {error}"]
