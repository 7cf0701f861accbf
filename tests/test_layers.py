"""The four layers hold: core <- methods <- zoo <- app, checked by import-linter over every import
statement (function-level ones too), and importing the library loads neither the layers above it nor
the heavy optional libraries."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def test_the_layer_contract_is_kept():
    run = subprocess.run(LINT, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 kept, 0 broken" in run.stdout


def test_the_contract_catches_an_import_inside_a_function(tmp_path):
    """A copy of the project's contract over a small tree whose core imports the zoo inside a function."""
    for package, body in {"vlmtools": "def load():\n    import vlmtools_zoo\n", "pruning": "import vlmtools\n",
                          "hallucination": "", "grounding": "", "tuning": "", "streaming": "", "vlmtools_zoo": "import pruning\n",
                          "vlmtools_app": "import vlmtools_zoo\n"}.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(body)
    config = (ROOT / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(config[config.index("[tool.importlinter]"):])
    run = subprocess.run(LINT, cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": ""})
    assert run.returncode == 1, run.stdout + run.stderr
    assert "vlmtools is not allowed to import vlmtools_zoo" in run.stdout


def test_importing_the_library_loads_no_zoo_app_diffusers_or_gguf():
    code = textwrap.dedent("""
        import sys
        import vlmtools, pruning, hallucination, grounding, tuning, streaming
        print(sorted({m.split('.')[0] for m in sys.modules} & {'vlmtools_zoo', 'vlmtools_app', 'diffusers', 'gguf'}))
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def test_a_family_module_and_its_library_load_when_its_model_is_wrapped():
    code = textwrap.dedent("""
        import sys
        import vlmtools
        from vlmtools.testing import tiny_flux
        assert 'vlmtools.adapters.flux' not in sys.modules
        transformer, _ = tiny_flux()
        print(vlmtools.wrap(transformer).family, 'vlmtools.adapters.flux' in sys.modules, 'vlmtools.adapters.sd3' in sys.modules)
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "flux True False"
