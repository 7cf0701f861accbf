"""The docs' examples run as written: docs/adding-a-family.md's VipLLaVA adapter (one
file, registered for the test's duration) with the sink detector, VAR, GIFT and FastV."""
import importlib.util
import re
from pathlib import Path

from vlmtools import adapters

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_adding_a_family_example_runs(tmp_path, capsys):
    module_text, check = python_blocks(DOCS / "adding-a-family.md")[:2]
    file = tmp_path / "vipllava.py"
    file.write_text(module_text.replace("from ..layout", "from vlmtools.layout")
                    .replace("from .base", "from vlmtools.adapters.base"))
    spec = importlib.util.spec_from_file_location("vipllava_example", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    adapters.FAMILIES.append(module.ADAPTER)
    try:
        exec(compile(check, "adding-a-family.md", "exec"), {})
    finally:
        adapters.FAMILIES.remove(module.ADAPTER)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "vipllava (4, 4)"
    assert any(line.startswith("VAR torch.Size([1, 4, 1, 21])") for line in printed)
    assert printed[-1] == "fastv torch.Size([1, 9])"
