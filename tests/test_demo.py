"""What the demo's report states, checked against the zoo world."""
import re

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # the demo report: about 40 s on a 2-core CPU


def test_the_pruning_table_says_how_much_of_the_image_lies_on_objects(demo_report):
    from vlmtools_zoo import world
    from vlmtools_zoo.card import patch_kinds

    text = demo_report.read_text()
    assert "<th>on objects</th>" in text
    rows = dict(re.findall(r"<tr><td>(plain \(144 tokens\)|FastV keep 16, debias o\w+)</td>"
                           r"(?:<td>[^<]*</td>){2}<td>([\d.]+)</td></tr>", text))
    assert rows.keys() == {"plain (144 tokens)", "FastV keep 16, debias off", "FastV keep 16, debias on"}
    questions = int(re.search(r"(\d+) held-out questions; speed-up", text).group(1))
    scenes = [world.scene("test", s) for s, _ in world.qa_items("test", questions)]
    share = np.mean([(patch_kinds(scene, (12, 12), letterbox=True) == "object").mean() for scene in scenes])
    assert float(rows["plain (144 tokens)"]) == round(float(share), 2)
    assert all(0 <= float(value) <= 1 for value in rows.values())


def test_the_report_draws_the_pruning_trade_off_of_its_small_run(demo_report):
    import json

    from vlmtools_app.demo import TRADEOFF

    text = demo_report.read_text()
    assert "accuracy and speed-up against the tokens kept" in text
    result = json.loads((demo_report.parent / "prune-bench.json").read_text())
    hosts = TRADEOFF[TRADEOFF.index("--hosts") + 1].split(",")
    assert set(result["results"]["accuracy"]) == {"none", *hosts, *(f"{h} +debias" for h in hosts if h == "fastv")}
    assert result["results"]["n"] == int(TRADEOFF[TRADEOFF.index("--questions") + 1])
    assert (demo_report.parent / "prune-bench.png").stat().st_size > 10_000
