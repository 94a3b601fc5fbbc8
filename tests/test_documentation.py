"""The documentation (README.md, docs/*.md, benchmarks/README.md) against the code (its commands:
test_documentation_commands.py).

- Every Python block is a file of `examples/`, or its `# [docs-start]` ... `# [docs-end]` region, and that file is
  run by a named test; a YAML block loads with the project's loaders.
- What the pages name exists: every `fw_trainer` module, class attribute and function, file path, `python -m` module,
  relative link and `--option`; no page cites a document outside the project.
- The README is a front page of at most 200 lines that starts with the two commands CI and a new user run.
- The resume rules the pages state are the ones `--help` prints, made from the run's identity fields.
"""

import fnmatch
import importlib
import importlib.util
import re
import shlex
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import lora_model, training_args
from doc_pages import (
    ALL_PAGES,
    BLOCKS,
    CLASS_ATTRIBUTE,
    DOTTED,
    EXAMPLE_TESTS,
    EXTERNAL_OPTIONS,
    FENCE,
    LINK,
    MODULE_RUN,
    OPTION,
    PAGES,
    PATH,
    README_MAX_LINES,
    REGION,
    ROOT,
    STUDY_MODULES,
    TEXTS,
    argparse_options,
    flat,
    has_parser,
    prose,
    shell_commands,
    stop_at_parser,
)

import fw_trainer
from fw_trainer.glue.arguments import DATA_ARGUMENTS, make_parser, parse_args
from fw_trainer.identity import RUN_FIELD_ARGUMENTS, resume_rules, run_identity
from fw_trainer.study.config import StudyConfig


# ----- Python blocks: examples a test runs -----------------------------------------------------------------------


def example_regions() -> dict[str, tuple[str, str]]:
    """What a page may show of each example: the whole file, or its marked region (dedented); by the text shown."""
    shown = {}
    for path in sorted((ROOT / "examples").glob("*.py")):
        name = str(path.relative_to(ROOT))
        source = path.read_text()
        shown[source] = (name, "the whole file")
        for match in REGION.finditer(source):
            shown[textwrap.dedent(match.group(1))] = (name, "its docs region")
    return shown


PYTHON_BLOCKS = [pytest.param(code, id=where) for where, language, code in BLOCKS if language == "python"]


@pytest.mark.parametrize("code", PYTHON_BLOCKS)
def test_every_python_block_is_an_example_that_a_test_runs(code):
    shown = example_regions()
    assert code in shown, "A Python block must be a file of examples/ or its `# [docs-start]` region, verbatim."
    example, _ = shown[code]
    test_file, test_name = EXAMPLE_TESTS[example].split("::")
    test_source = (ROOT / test_file).read_text()
    assert f"def {test_name}(" in test_source and Path(example).name in test_source


def test_every_marked_region_is_shown_and_every_example_test_exists():
    shown = {code for where, language, code in BLOCKS if language == "python"}
    for text, (example, what) in example_regions().items():
        if what == "its docs region":
            assert text in shown, f"The docs region of {example} is shown on no page."
    for example, test in EXAMPLE_TESTS.items():
        test_file, test_name = test.split("::")
        assert (ROOT / example).is_file() and f"def {test_name}(" in (ROOT / test_file).read_text()


# ----- YAML blocks, and no other kind -----------------------------------------------------------------------------


def test_every_yaml_block_loads_with_the_projects_loaders(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    for _, language, code in BLOCKS:
        if language not in ("yaml", "yml"):
            continue
        config = yaml.safe_load(code)
        path = tmp_path / "block.yaml"
        path.write_text(code)
        if isinstance(config, dict) and "axes" in config:  # a study
            StudyConfig.from_yaml(str(path))
        elif isinstance(config, dict):  # a run of the GLUE script
            parse_args([str(path)])


def test_every_code_block_has_a_checked_language_and_none_is_indented():
    checked = {"python", "bash", "sh", "console", "shell", "yaml", "yml"}
    assert sorted(where for where, language, _ in BLOCKS if language not in checked) == []
    for page, text in TEXTS.items():
        lines = prose(text).splitlines()
        for at, line in enumerate(lines[1:], 1):
            # An indented code block: 4 spaces after a blank line that does not continue a list item.
            if line.startswith("    ") and not lines[at - 1].strip():
                previous = next((p for p in reversed(lines[: at - 1]) if p.strip()), "")
                assert previous.startswith(("-", "*", " ", "|")) or re.match(r"\d+\.", previous), (page, line)


# ----- What the pages name exists ---------------------------------------------------------------------------------


def test_every_path_named_in_the_pages_exists():
    paths = set(PATH.findall(ALL_PAGES))
    assert paths
    # transformers' run_glue.py, which the pages name as what the script mirrors, is not ours.
    ours = {path for path in paths if not path.startswith("examples/pytorch/")}
    assert sorted(path for path in ours if not (ROOT / path).exists()) == []


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page, text in TEXTS.items():
        for target in LINK.findall(prose(text)):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", prose(linked.read_text()), re.MULTILINE)
                if anchor not in {slug(heading) for heading in headings}:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_every_fw_trainer_name_in_the_pages_exists():
    for name in set(DOTTED.findall(ALL_PAGES)):
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


def test_every_class_attribute_named_in_the_pages_exists():
    named = {(cls, attribute) for cls, attribute in CLASS_ATTRIBUTE.findall(ALL_PAGES) if hasattr(fw_trainer, cls)}
    assert ("FWLoraTrainer", "set_method_arguments") in named
    assert (
        sorted(f"{cls}.{attribute}" for cls, attribute in named if not hasattr(getattr(fw_trainer, cls), attribute))
        == []
    )


def test_every_python_m_module_in_the_pages_exists():
    modules = set(MODULE_RUN.findall(ALL_PAGES))
    assert "fw_trainer.study.sweep" in modules
    assert sorted(module for module in modules if importlib.util.find_spec(module) is None) == []


def program_options(program: str, monkeypatch) -> set[str]:
    """The options of a script's or a `python -m` module's argparse parser, read without running it."""
    if program.endswith(".py") and not has_parser(program):
        return set()
    return argparse_options(stop_at_parser(program, [], monkeypatch, parse=False).parser)


def tool_options(text: str, monkeypatch) -> set[str]:
    """The options of every program a page names: the GLUE script always, and each script, study module or external
    program that appears on the page."""
    options = argparse_options(make_parser())
    for script in sorted(set(re.findall(r"\b((?:examples|benchmarks|scripts)/\w+\.py)\b", text))):
        options |= program_options(script, monkeypatch)
    for module in STUDY_MODULES:
        if module in text or module.replace(".", "/") + ".py" in text:
            options |= program_options(module, monkeypatch)
    if "accelerate launch" in text:
        from accelerate.commands.launch import launch_command_parser

        options |= argparse_options(launch_command_parser())
    if "torchrun" in text:
        from torch.distributed.run import get_args_parser

        options |= argparse_options(get_args_parser())
    for program, extra in EXTERNAL_OPTIONS.items():
        if program in text:
            options |= extra
    return options


@pytest.mark.parametrize("page", [pytest.param(page, id=str(page.relative_to(ROOT))) for page in PAGES])
def test_every_option_named_in_prose_is_an_option_of_the_program_named(page, monkeypatch):
    text = TEXTS[page]
    options = tool_options(text, monkeypatch)
    named = set(OPTION.findall(prose(text)))
    # `--fw_*`, `--max_*_samples`: a pattern over options.
    unknown = {name for name in named if not fnmatch.filter(options, name.replace("*", "?*"))}
    assert sorted(unknown) == []


def test_no_page_or_config_cites_a_document_outside_the_project():
    configs = {path: path.read_text() for path in sorted((ROOT / "configs").rglob("*.yaml"))}
    citing = [str(path.relative_to(ROOT)) for path, text in {**TEXTS, **configs}.items() if "DESIGN" in text]
    assert citing == []


# ----- The README is a front page ----------------------------------------------------------------------------------


def test_the_readme_is_a_front_page_that_starts_with_the_two_commands():
    text = TEXTS[ROOT / "README.md"]
    assert len(text.splitlines()) <= README_MAX_LINES
    first = FENCE.search(text)
    # Within the first screen, after what FW-LoRA is and its formula: the main job, then the tests (CI runs it).
    assert text[: first.start()].count("\n") < 20 and "L = L_task + λ Σ_m (1 − I_m) ‖ΔW_m‖_F²" in text[: first.start()]
    assert [shlex.join(words) for words in shell_commands(first.group(2))] == ["make quickstart", "make test"]
    shown = {code for where, language, code in BLOCKS if where.startswith("README.md") and language == "python"}
    regions = {example for code, (example, _) in example_regions().items() if code in shown}
    assert regions == {"examples/trainer_fw_lora.py", "examples/sft_fw_lora.py"}
    glue_lines = [c for where, lang, code in BLOCKS if where.startswith("README") for c in shell_commands(code)]
    assert ["python", "run_glue_fw.py", "configs/sst2_fw_lora_0.2.yaml"] in glue_lines
    for page in PAGES[1:]:
        if page.parent.name == "docs":
            assert f"(docs/{page.name})" in text, f"README.md does not link to docs/{page.name}"


# ----- The resume rules --------------------------------------------------------------------------------------------


def test_the_pages_and_help_state_the_resume_rules_made_from_the_identity_fields():
    rules = flat(resume_rules(DATA_ARGUMENTS))
    quoted = flat(" ".join(line[2:] for line in ALL_PAGES.splitlines() if line.startswith("> ")))
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
