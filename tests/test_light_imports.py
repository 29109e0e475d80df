"""The pipeline's table and figure steps run without importing torch or timm
(each job of the DAG is a fresh interpreter: torch and timm cost seconds).
Each check runs in a fresh subprocess, since this test process has torch."""
import subprocess
import sys

import pytest

#: modules the torch-free jobs import (scripts/analysis.py, report.py, summarise.py)
TORCH_FREE = [
    "tokenreduction",
    "tokenreduction.analysis",
    "tokenreduction.analysis.stage",
    "tokenreduction.report",
    "tokenreduction.summary",
    "tokenreduction.io",
    "tokenreduction.provenance",
]


def _imported(code: str) -> set:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.mark.parametrize("module", TORCH_FREE)
def test_table_and_figure_modules_import_without_torch(module):
    loaded = _imported(f"import {module}")
    assert module in loaded
    assert "torch" not in loaded and "timm" not in loaded, module


def test_scripts_of_table_jobs_import_without_torch():
    # the scripts' own imports, as the rules run them (their main() is not called)
    code = (
        "import runpy, sys\n"
        "for s in ('analysis', 'report', 'summarise'):\n"
        "    runpy.run_path(f'scripts/{s}.py', run_name='not_main')\n"
    )
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code + "print('torch' in sys.modules, 'timm' in sys.modules)"],
                         capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_lazy_package_attributes_load_on_first_use():
    loaded = _imported(
        "import tokenreduction as tr\n"
        "assert tr.get_method('topk') is not None and tr.r_schedule(2, 3) == [2, 2, 2]\n"
        "assert callable(tr.create_model) and tr.models.list_extensions() and 'clca' in tr.models.list_extensions()\n"
        "assert tr.analysis.kld is not None\n"
        "try:\n    tr.nonexistent\nexcept AttributeError as e:\n    assert 'nonexistent' in str(e)\nelse:\n    raise SystemExit('no AttributeError')\n"
    )
    assert {"torch", "timm", "tokenreduction.clca", "tokenreduction.models.vit"} <= loaded


def test_extension_found_by_name_without_importing_clca_first():
    # the clca extension registers itself on the first lookup, not at package import
    loaded = _imported(
        "from tokenreduction.models import get_extension\n"
        "import sys; assert 'tokenreduction.clca' not in sys.modules\n"
        "assert get_extension('clca').__module__.startswith('tokenreduction.clca')\n"
    )
    assert "tokenreduction.clca" in loaded
