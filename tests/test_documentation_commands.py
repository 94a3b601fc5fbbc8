"""Every shell command the documentation shows (code blocks and commands in prose) is parsed by its program's own
parser: the GLUE script's `parse_args`, the study's and the scripts' argparse, accelerate's and torchrun's launchers;
`make` targets exist in the Makefile, `pip install` extras in setup.cfg; and a wrong command fails the check."""

import re
import shlex

import pytest
from doc_pages import (
    BLOCKS,
    INLINE_CODE,
    INLINE_COMMAND,
    ROOT,
    TEXTS,
    check_command,
    expand_braces,
    flat,
    prose,
    shell_commands,
)

from fw_trainer.errors import UsageError


SHELL_BLOCKS = [
    pytest.param(code, id=where) for where, language, code in BLOCKS if language in ("bash", "sh", "console", "shell")
]


@pytest.mark.parametrize("code", SHELL_BLOCKS)
def test_every_shell_command_parses_with_its_programs_parser(code, monkeypatch):
    monkeypatch.chdir(ROOT)  # paths as the pages write them, from the repository root
    commands = shell_commands(code)
    assert commands
    for words in commands:
        check_command(words, monkeypatch)


def inline_commands() -> list:
    """Commands written in prose, as `` `make quickstart ARGS=--overwrite_output_dir` ``, without placeholders."""
    commands = []
    for page, text in TEXTS.items():
        for span in INLINE_CODE.findall(prose(text)):
            span = flat(span)
            # Placeholders (`<GLUE_DIR>`, `[MODEL]`, `...`) and a bare module (`python -m fw_trainer.glue.run`, whose
            # existence another test checks) are not commands to parse.
            placeholder = re.search(r"<\w+>|\[[A-Z]+\]|\.\.\.", span)
            if INLINE_COMMAND.match(span) and not placeholder and not re.fullmatch(r"python -m [\w.]+", span):
                commands.append(pytest.param(span, id=f"{page.relative_to(ROOT)}: {span[:60]}"))
    return commands


@pytest.mark.parametrize("command", inline_commands())
def test_every_command_in_prose_parses_with_its_programs_parser(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    for words in expand_braces(shlex.split(command)):
        check_command(words, monkeypatch)


@pytest.mark.parametrize(
    "command",
    [
        "python run_glue_fw.py configs/sst2_fw_lora_0.2.yaml --fw_lamda 1e-3",
        "python run_glue_fw.py configs/sst2_fw_lora_0.2.yaml --fw_lambda nan",
        "python -m fw_trainer.study.sweep configs/studies/cpu_minilm.yaml --paralel 2",
        "python -m fw_trainer.study.aggregate configs/studies/no_such_study.yaml",
        "python benchmarks/steps.py --rounds three",
        "python benchmarks/steps.py --round 3",
        "python examples/trainer_fw_lora.py --max_step 8",
        "accelerate launch --config_file configs/no_such_file.yaml run_glue_fw.py configs/sst2_fw_lora_0.2.yaml",
        "make quickstrat",
        "make quickstart ARGS=--overwrite_output",
        'pip install "fw-lora[gleu]"',
        "python examples/no_such_example.py",
        "sh setup.sh",
    ],
)
def test_a_wrong_command_fails_the_check(command, monkeypatch):
    # The checks above would pass vacuously if the rules accepted anything.
    monkeypatch.chdir(ROOT)
    with pytest.raises((AssertionError, UsageError, ValueError)):
        check_command(shlex.split(command), monkeypatch)
