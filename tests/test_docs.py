"""The docs' examples run as written: each package README's complete example, docs/adding-a-method.md's
ImageBoost, and docs/adding-a-family.md's VipLLaVA adapter (one file, registered for the test's
duration) with the sink detector, VAR, GIFT and FastV. (The other blocks are fragments that use
the user's own model, data or files.)"""
import importlib.util
import re
from pathlib import Path

import pytest

from vlmtools import adapters

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
COMPLETE_EXAMPLES = [("vlmtools/README.md", 0), ("pruning/README.md", 1), ("hallucination/README.md", 0),
                     ("vlmtools_zoo/README.md", 0), ("vlmtools_app/README.md", 0),
                     ("grounding/README.md", 3), ("docs/adding-a-method.md", 0), ("tuning/README.md", 1),
                     ("streaming/README.md", 1)]
"""(file, index of its python block) of every example that defines everything it uses."""


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize(("path", "index"), COMPLETE_EXAMPLES)
def test_complete_example_runs(path, index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # examples that save write here
    monkeypatch.syspath_prepend(str(ROOT))  # "from vlmtools.testing.vlm import ..."
    exec(compile(python_blocks(ROOT / path)[index], path, "exec"), {})
    assert capsys.readouterr().out.strip() or path.startswith("grounding")
    if path.startswith("grounding"):
        assert {p.name for p in (tmp_path / "out").iterdir()} >= {"mask.png", "heatmap.png"}


def test_adding_a_family_example_runs(tmp_path, capsys):
    module_text, check = python_blocks(DOCS / "adding-a-family.md")[:2]
    file = tmp_path / "vipllava.py"
    file.write_text(module_text.replace("from ..layout", "from vlmtools.layout")
                    .replace("from .", "from vlmtools.adapters."))
    spec = importlib.util.spec_from_file_location("vipllava_example", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    adapters.register(module.ADAPTER)
    try:
        exec(compile(check, "adding-a-family.md", "exec"), {})
    finally:
        adapters.unregister(module.ADAPTER)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "vipllava (4, 4)"
    assert any(line.startswith("VAR torch.Size([1, 4, 1, 21])") for line in printed)
    assert printed[-2] == "fastv torch.Size([1, 9])"
    assert any(line.startswith("PAINT torch.Size([1, 4, 1, 21])") for line in printed)
    assert printed[-1] == ("visionzip ranks by the vision encoder's [CLS] attention; vipllava: "
                           + module.ADAPTER.vision.no_cls)  # the family's reason
