"""The built wheel carries every module, recipe package and data file of the source tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_built_wheel_holds_every_recipe_package_and_its_yaml(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("tfkit-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    source = {p.relative_to(ROOT).as_posix() for suffix in ("*.py", "*.yaml", "*.js", "*.html", "*.css")
              for p in (ROOT / "tfkit").rglob(suffix) if "__pycache__" not in p.parts}
    assert {"tfkit/train.yaml", "tfkit/recipes/translation/translation.yaml", "tfkit/recipes/vit/vit.yaml"} <= source
    assert source - shipped == set()
    recipes = {p.parent.name for p in (ROOT / "tfkit" / "recipes").glob("*/__init__.py")}
    assert recipes == {"bert", "causal_lm", "conformer", "forecast", "translation", "vit"}
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in shipped)
