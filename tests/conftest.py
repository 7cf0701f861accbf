"""Fixtures shared by test modules."""
import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def demo_report(tmp_path_factory):
    """``report.html`` of one ``vlmtools demo`` run (about a minute), shared by every test that reads it."""
    out = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, "-m", "vlmtools_app.cli", "demo", "--out", str(out)], check=True)
    return out / "report.html"


@pytest.fixture
def train_cache(tmp_path, monkeypatch):
    """An empty ``VLMTOOLS_CACHE`` for trainer runs, with the dequantised SmolLM2 linked in
    (no second dequantisation); its ``train/`` folder receives the checkpoints."""
    from vlmtools_zoo.lm import smollm2_dir

    lm = smollm2_dir()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / lm.name).symlink_to(lm)
    monkeypatch.setenv("VLMTOOLS_CACHE", str(cache))
    return cache
