"""Fixtures shared by test modules."""
import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def demo_report(tmp_path_factory):
    """``report.html`` of one ``vlmtools demo`` run (about a minute), shared by every test that reads it."""
    out = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, "-m", "vlmtools.cli", "demo", "--out", str(out)], check=True)
    return out / "report.html"
