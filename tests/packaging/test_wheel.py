"""The built wheel carries schemas/ and templates/ and works from outside the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # Build from a copy so that no build/ or egg-info debris lands in the checkout.
    src = tmp_path_factory.mktemp("src") / "kvmctl"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info",
                                                             "build", "__pycache__", ".cache"))
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                    str(out), str(src)], check=True, capture_output=True)
    return next(out.glob("kvmctl-*.whl"))


def test_wheel_contains_schemas_and_templates(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for kind in ("virtualmachine", "network", "disk", "image", "storagepool", "common"):
        assert f"kvmctl/schemas/{kind}.schema.json" in names
    for template in ("domain", "network", "pool", "volume"):
        assert f"kvmctl/templates/{template}.xml.j2" in names


def test_wheel_installs_and_runs_outside_checkout(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = venv / "bin" / "pip"
    subprocess.run([str(pip), "install", "-q", str(wheel)], check=True, capture_output=True,
                   text=True)
    kvmctl = venv / "bin" / "kvmctl"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(ROOT / "examples" / "quickstart", elsewhere / "quickstart")
    help_run = subprocess.run([str(kvmctl), "--help"], cwd=elsewhere, capture_output=True,
                              text=True)
    assert help_run.returncode == 0, help_run.stderr
    assert "validate" in help_run.stdout and "apply" in help_run.stdout
    check = subprocess.run([str(kvmctl), "validate", "-f", "quickstart"], cwd=elsewhere,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "valid" in check.stdout
    render = subprocess.run([str(kvmctl), "render", "-f", "quickstart", "--kind", "Network"],
                            cwd=elsewhere, capture_output=True, text=True)
    assert render.returncode == 0 and "<network>" in render.stdout, render.stderr
