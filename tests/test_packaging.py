"""The wheel ships passes/ as normprop_fx.passes and installs no top-level `passes` module."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("normprop_fx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert top_level == {"normprop_fx", next(t for t in top_level if t.endswith(".dist-info"))}
    assert "normprop_fx/passes/match.py" in names and "normprop_fx/passes/patterns.py" in names
    assert "normprop_fx/layers.py" in names


def test_passes_import_as_subpackage():
    import normprop_fx.passes.match as match

    assert Path(match.__file__).resolve().parent == ROOT / "passes"
