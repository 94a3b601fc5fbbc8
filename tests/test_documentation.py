"""What README.md names exists: every `fw_trainer` module, class attribute and function, every file path and every
`python -m` module; and the resume rules it states are the ones `--help` prints, made from the run's identity fields."""

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
from conftest import lora_model, training_args

import fw_trainer
from fw_trainer.glue.arguments import DATA_ARGUMENTS, make_parser
from fw_trainer.identity import RUN_FIELD_ARGUMENTS, resume_rules, run_identity


ROOT = Path(__file__).resolve().parents[1]
# README.md and the pages it links to in docs/: the same checks hold for every page.
README = "\n".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
# Paths inside the repository, as README.md writes them (`configs/...`, `fw_trainer/glue/run.py`, ...).
PATH = re.compile(r"(?<![\w/.-])((?:configs|benchmarks|examples|scripts|tests|fw_trainer|results|docs)/[\w./-]*[\w/])")
DOTTED = re.compile(r"\bfw_trainer(?:\.\w+)+")
CLASS_ATTRIBUTE = re.compile(r"`([A-Z]\w+)\.(\w+)")
MODULE_RUN = re.compile(r"python -m ([\w.]+)")


def flat(text: str) -> str:
    return " ".join(text.split())


def test_every_path_named_in_the_readme_exists():
    paths = set(PATH.findall(README))
    assert paths
    # transformers' run_glue.py, which README.md names as what the script mirrors, is not ours.
    ours = {path for path in paths if not path.startswith("examples/pytorch/")}
    assert sorted(path for path in ours if not (ROOT / path).exists()) == []


def test_every_fw_trainer_name_in_the_readme_exists():
    for name in set(DOTTED.findall(README)):
        parts = name.split(".")
        # The longest importable module, then attributes below it.
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for attribute in parts[cut:]:
            assert hasattr(obj, attribute), name
            obj = getattr(obj, attribute)


def test_every_class_attribute_named_in_the_readme_exists():
    named = {(cls, attribute) for cls, attribute in CLASS_ATTRIBUTE.findall(README) if hasattr(fw_trainer, cls)}
    assert ("FWLoraTrainer", "set_method_arguments") in named
    assert (
        sorted(f"{cls}.{attribute}" for cls, attribute in named if not hasattr(getattr(fw_trainer, cls), attribute))
        == []
    )


def test_every_python_m_module_in_the_readme_exists():
    modules = set(MODULE_RUN.findall(README))
    assert "fw_trainer.study.sweep" in modules
    assert sorted(module for module in modules if importlib.util.find_spec(module) is None) == []


def test_the_readme_and_help_state_the_resume_rules_made_from_the_identity_fields():
    rules = flat(resume_rules(DATA_ARGUMENTS))
    quoted = flat(" ".join(line[2:] for line in README.splitlines() if line.startswith("> ")))
    assert rules in quoted
    assert rules in flat(make_parser().format_help())


@pytest.mark.parametrize("method", ["fw_lora", "adalora"])
def test_every_identity_field_has_its_argument_in_the_resume_rules(tmp_path, method):
    model, fw_args = lora_model(method)
    run = run_identity(model, fw_args, training_args(tmp_path))["run"]
    method_fields = {name for name in run if name.startswith(("fw_", "adalora_"))}
    assert set(run) - method_fields - {"data"} <= set(RUN_FIELD_ARGUMENTS)
    assert method_fields  # the method's own arguments, covered by "--fw_*"
    rules = resume_rules(DATA_ARGUMENTS)
    for argument in RUN_FIELD_ARGUMENTS.values():
        assert argument in rules


def test_run_identity_is_a_function_of_its_module():
    # `fw_trainer.run_identity` is the function; the module is `fw_trainer.identity`.
    assert callable(fw_trainer.run_identity) and fw_trainer.run_identity is run_identity
