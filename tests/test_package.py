"""The built wheel carries every module, recipe package and data file of the source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_built_wheel_holds_every_recipe_package_and_its_yaml(tmp_path):
    # built from a copy: setuptools leaves build/ and *.egg-info beside the sources it builds
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / "src" / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(tmp_path / "src")],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("tfkit-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    source = {name for name in tracked if name.startswith("tfkit/") and name.endswith((".py", ".yaml", ".js", ".html", ".css"))}
    assert {"tfkit/train.yaml", "tfkit/recipes/translation/translation.yaml", "tfkit/recipes/vit/vit.yaml"} <= source
    assert source - shipped == set()
    recipes = {p.parent.name for p in (ROOT / "tfkit" / "recipes").glob("*/__init__.py")}
    assert recipes == {"bert", "causal_lm", "conformer", "forecast", "translation", "vit"}
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in shipped)
