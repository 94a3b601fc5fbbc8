"""The package as a user installs it: built from the checkout into a fresh virtual environment outside it (no network:
`--no-deps --no-build-isolation`, the dependencies borrowed from this environment), the GLUE runner and the study
work from there, without the checkout."""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from fw_trainer.study.config import StudyConfig


ROOT = Path(__file__).resolve().parents[1]
# What the package is built from; nothing else of the checkout goes along.
PACKAGE_FILES = ("fw_trainer", "setup.cfg", "pyproject.toml", "README.md")
# The environment of a user's shell: no PYTHONPATH pointing into a checkout.
OUTSIDE = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with fw-lora installed (not editable) from a copy of the package files; returns
    its Python."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    for name in PACKAGE_FILES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(
            ROOT / name,
            source / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}),
        )
    environment = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(environment)], check=True)
    python = environment / "bin" / "python"
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The dependencies (torch, transformers, ...) from this environment, after the new one's own packages.
    (Path(site_packages) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps"]
    subprocess.run([*install, "--no-build-isolation", str(source)], check=True, capture_output=True)
    return python


def run_outside(python: Path, tmp_path: Path, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *command], cwd=tmp_path, env=OUTSIDE, capture_output=True, text=True)


def test_the_installed_package_is_the_one_imported(installed, tmp_path):
    result = run_outside(installed, tmp_path, "-c", "import fw_trainer; print(fw_trainer.__file__)")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(installed.parents[1])


def test_the_glue_runner_is_installed_as_a_module_and_a_command(installed, tmp_path):
    for command in ([str(installed), "-m", "fw_trainer.glue.run"], [str(installed.parent / "fw-lora-glue")]):
        result = subprocess.run([*command, "--help"], cwd=tmp_path, env=OUTSIDE, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "--fw_lambda" in result.stdout and "Resuming" in result.stdout


def test_the_study_dry_run_works_from_the_installed_package(installed, tmp_path):
    study = yaml.safe_load((ROOT / "configs" / "studies" / "cpu_minilm.yaml").read_text())
    study.update(output_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    result = run_outside(installed, tmp_path, "-m", "fw_trainer.study.sweep", "study.yaml", "--dry_run")
    assert result.returncode == 0, result.stderr[-2000:]
    commands = [line for line in result.stdout.splitlines() if "[to run]" in line]
    assert len(commands) == len(StudyConfig.from_yaml(str(tmp_path / "study.yaml")).runs()) > 0
    assert all(f"{installed} -m fw_trainer.glue.run " in line for line in commands)
    assert str(ROOT) not in result.stdout  # nothing of the checkout


def test_the_method_requires_torch_transformers_peft_and_accelerate_only(installed, tmp_path):
    """`pip install fw-lora` pulls the method's four libraries; the GLUE script and the study come with extras."""
    script = "import json, re; from importlib.metadata import requires; print(json.dumps(requires('fw-lora')))"
    result = run_outside(installed, tmp_path, "-c", script)
    assert result.returncode == 0, result.stderr
    plain, extras = set(), {}
    for requirement in json.loads(result.stdout):
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        marker = re.search(r"extra == ['\"]([\w-]+)['\"]", requirement)
        if marker is None:
            plain.add(name)
        else:
            extras.setdefault(marker.group(1), set()).add(name)
    assert plain == {"torch", "transformers", "peft", "accelerate"}
    assert {"datasets", "scikit-learn", "scipy", "matplotlib"} <= extras["glue"]
    assert extras["study"] == {"fw-lora"}  # fw-lora[glue]
