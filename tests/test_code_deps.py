"""simlm_core.code_deps: the core files a stage runs, read from the sources."""
from __future__ import annotations

from pathlib import Path

import pytest

from simlm_core.code_deps import core_imports, core_module_closure


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_closure_follows_lazy_imports_packages_and_modules_imported_from_a_package(tmp_path):
    _write(tmp_path, {
        "simlm_core/drivers/__init__.py": "",
        "simlm_core/drivers/run.py": "import json\nfrom simlm_core import training\n",
        "simlm_core/training.py": "def go():\n    from simlm_core.modeling.packed import PackedBatch\n",
        "simlm_core/modeling/__init__.py": "",
        "simlm_core/modeling/packed.py": "import simlm_core.modeling.kernels as k\n",
        "simlm_core/modeling/kernels.py": "import torch\n",
        "simlm_core/unused.py": "",
    })
    core = tmp_path / "simlm_core"
    found = core_module_closure([core / "drivers" / "run.py"], tmp_path)
    assert [str(Path(f).relative_to(core)) for f in found] == [
        "drivers/__init__.py", "drivers/run.py", "modeling/__init__.py", "modeling/kernels.py",
        "modeling/packed.py", "training.py"]
    assert core_imports(core / "drivers" / "run.py") == {"simlm_core", "simlm_core.training"}


def test_relative_imports_and_missing_files_are_named(tmp_path):
    _write(tmp_path, {"simlm_core/a.py": "x = 1\nfrom . import b\n"})
    with pytest.raises(ValueError, match=r"a\.py:2: relative import"):
        core_imports(tmp_path / "simlm_core" / "a.py")
    with pytest.raises(FileNotFoundError, match="nope.py"):
        core_module_closure([tmp_path / "simlm_core" / "nope.py"], tmp_path)


def test_the_library_itself_is_readable():
    """Every core module parses and uses absolute imports, so the workflow can follow them all."""
    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "simlm_core").rglob("*.py"))
    assert len(core_module_closure(files, root)) == len(files)
