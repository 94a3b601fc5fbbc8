"""The documentation pages (README.md, docs/*.md, benchmarks/README.md) as the documentation tests read them, and the
checks that run a command through its program's own parser without running it."""

import argparse
import configparser
import importlib
import importlib.util
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch
from conftest import load_script

from fw_trainer.glue.arguments import make_parser, parse_args
from fw_trainer.study.config import StudyConfig
from fw_trainer.study.cost_benefit import read_spec


ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
TEXTS = {page: page.read_text() for page in PAGES}
ALL_PAGES = "\n".join(TEXTS.values())
README_MAX_LINES = 200
# Paths inside the repository, as the pages write them (`configs/...`, `fw_trainer/glue/run.py`, ...).
PATH = re.compile(r"(?<![\w/.-])((?:configs|benchmarks|examples|scripts|tests|fw_trainer|results|docs)/[\w./-]*[\w/])")
DOTTED = re.compile(r"\bfw_trainer(?:\.\w+)+")
CLASS_ATTRIBUTE = re.compile(r"`([A-Z]\w+)\.(\w+)")
MODULE_RUN = re.compile(r"python -m ([\w.]+)")
FENCE = re.compile(r"^```(\S*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`]+)`")
# A command in prose, e.g. `make quickstart ARGS=--overwrite_output_dir` or `python run_glue_fw.py --help`.
INLINE_COMMAND = re.compile(r"^(?:[A-Z_]+=\S+ )*(?:make|python3?|fw-lora-glue|accelerate|torchrun|pip) ")
OPTION = re.compile(r"(?<![\w-])--[A-Za-z*][\w*-]*")
REGION = re.compile(r"^[ \t]*# \[docs-start\]\n(.*?)^[ \t]*# \[docs-end\]$", re.DOTALL | re.MULTILINE)

# Each example a page shows, and the test that runs it (and names the file).
EXAMPLE_TESTS = {
    "examples/trainer_fw_lora.py": "tests/test_core_install.py::"
    "test_the_trainer_example_trains_fw_lora_with_the_core_install_only",
    "examples/sft_fw_lora.py": "tests/test_sft.py::"
    "test_the_example_runs_and_leaves_importances_and_a_reloadable_adapter",
    "examples/custom_loop.py": "tests/test_custom_loop.py::test_custom_loop_trains_like_fw_lora_trainer",
}
# The options of programs the pages mention that are not this project's (their full parsers are not at hand).
EXTERNAL_OPTIONS = {"pip install": {"--no-deps"}, "tensorboard": {"--logdir"}}
STUDY_MODULES = ("fw_trainer.study.sweep", "fw_trainer.study.aggregate", "fw_trainer.study.cost_benefit")


def flat(text: str) -> str:
    return " ".join(text.split())


def prose(text: str) -> str:
    """`text` without its fenced code blocks."""
    return FENCE.sub("", text)


def code_blocks() -> list[tuple[str, str, str]]:
    """`(where, language, code)` of every fenced code block of every page, `where` as `README.md:12`."""
    blocks = []
    for page, text in TEXTS.items():
        for match in FENCE.finditer(text):
            line = text[: match.start()].count("\n") + 1
            blocks.append((f"{page.relative_to(ROOT)}:{line}", match.group(1), match.group(2)))
    return blocks


BLOCKS = code_blocks()


class Parsed(Exception):
    """Raised in place of running a program once its argparse parser is asked to parse."""

    def __init__(self, parser: argparse.ArgumentParser, namespace: Optional[argparse.Namespace]):
        super().__init__()
        self.parser = parser
        self.namespace = namespace


def stop_at_parser(program: str, argv: list[str], monkeypatch, parse: bool = True) -> Parsed:
    """
    Runs `program` (a script of the repository, or a `python -m` module) until its argparse parser is asked to parse
    `argv`, and returns that parser with what it made of `argv` (if `parse`), without running anything else.

    Raises:
        `SystemExit`: From argparse, for `--help` (code 0) or a command line it refuses (code 2).
    """
    script = program.endswith(".py")
    with monkeypatch.context() as patch:
        parse_args = argparse.ArgumentParser.parse_args

        def stop(self, args=None, namespace=None):
            raise Parsed(self, parse_args(self, args, namespace) if parse else None)

        patch.setattr(argparse.ArgumentParser, "parse_args", stop)
        patch.setattr(sys, "argv", [program, *argv])
        if script:
            patch.syspath_prepend(str((ROOT / program).parent))  # benchmarks/ import their `common`
            main = load_script(ROOT / program).main
        else:
            main = importlib.import_module(program).main
        try:
            main() if script else main(argv)
        except Parsed as parsed:
            return parsed
    raise AssertionError(f"{program} did not parse its command line with argparse")


def argparse_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every `--option` a parser takes, aliases included."""
    return {option for option in parser._option_string_actions if option.startswith("--")}


def unknown_options(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """The options of `argv` that `parser` does not take as written (argparse would take an unambiguous abbreviation
    such as `--overwrite_output` too: the pages spell options out)."""
    return [arg for arg in argv if arg.startswith("--") and arg.split("=")[0] not in argparse_options(parser)]


def has_parser(script: str) -> bool:
    """Whether a script parses its command line (`examples/custom_loop.py [MODEL]` takes it as it comes)."""
    return "parse_args(" in (ROOT / script).read_text()


def expand_braces(words: list[str]) -> list[list[str]]:
    """`--fw_estimator {exact,sketch}` as the commands it stands for."""
    for at, word in enumerate(words):
        match = re.fullmatch(r"\{([\w.,-]+,[\w.,-]+)\}", word)
        if match:
            return [
                command
                for choice in match.group(1).split(",")
                for command in expand_braces(words[:at] + [choice] + words[at + 1 :])
            ]
    return [words]


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, prompts, comments and blank lines left out."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.strip().removeprefix("$ ")
        words = shlex.split(line, comments=True)
        if words:
            commands += expand_braces(words)
    return commands


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))


def setup_extras() -> set[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return set(config["options.extras_require"])


def check_glue_command(argv: list[str]) -> None:
    """The GLUE script's own parsing (its dataclasses and the checks `parse_args` makes), from the repository root."""
    assert unknown_options(argv, make_parser()) == []
    if not torch.cuda.is_available():
        # The pages' GPU commands (`--bf16`) as a GPU box parses them: without a GPU, transformers refuses bf16
        # unless the run is told to use the CPU, where bf16 autocast is legal too.
        argv = [*argv, "--use_cpu", "true"]
    try:
        parse_args(argv)
    except SystemExit as exit:  # --help
        assert exit.code == 0 and "--help" in argv, argv


def check_python_command(words: list[str], monkeypatch) -> None:
    """`python run_glue_fw.py ...`, `python -m fw_trainer....`, `python examples/x.py ...`,
    `python benchmarks/x.py`."""
    program, argv = (words[1], words[2:]) if words[0] == "-m" else (words[0], words[1:])
    if program in ("run_glue_fw.py", "fw_trainer.glue.run"):
        return check_glue_command(argv)
    if words[0] == "-m":
        assert program in STUDY_MODULES, f"no rule for python -m {program}"
    else:
        assert program.split("/")[0] in ("examples", "benchmarks", "scripts") and (ROOT / program).is_file(), program
        if not has_parser(program):
            return
    try:
        parsed = stop_at_parser(program, argv, monkeypatch)
    except SystemExit as exit:
        assert exit.code == 0 and "--help" in argv, f"{program} refuses {shlex.join(argv)}"
        return
    assert unknown_options(argv, parsed.parser) == []
    namespace = parsed.namespace
    if program == "fw_trainer.study.cost_benefit":  # the cost/benefit file it names loads
        read_spec(namespace.spec)
    elif program in STUDY_MODULES:  # the study files it names load
        for study in [namespace.study] if isinstance(namespace.study, str) else namespace.study:
            StudyConfig.from_yaml(study)


def check_under_torchrun(words: list[str]) -> None:
    """A GLUE command as one process of a torchrun launch parses it: with torchrun's environment, in a process of its
    own (transformers sets up the process group when it parses `--ddp_backend`, which must not outlive the check)."""
    assert words[0] == "run_glue_fw.py", f"no rule for {shlex.join(words)} under torchrun"
    assert unknown_options(words[1:], make_parser()) == []
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    environment = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    environment.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    argv = [*words[1:], *([] if torch.cuda.is_available() else ["--use_cpu", "true"])]
    code = "import sys; from fw_trainer.glue.arguments import parse_args; parse_args(sys.argv[1:])"
    result = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def check_command(words: list[str], monkeypatch) -> None:
    """One command of a page, by its program."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # GLUE_DIR=... make quickstart
        words = words[1:]
    program, arguments = words[0], words[1:]
    if program == "export":
        assert all(re.fullmatch(r"[A-Z_]+=\S+", word) for word in arguments), words
    elif program == "make":
        targets = [word for word in arguments if "=" not in word]
        assert targets and set(targets) <= makefile_targets(), f"unknown make target in {words}"
        extra = dict(word.split("=", 1) for word in arguments if "=" in word)
        if "quickstart" in targets:
            check_glue_command(["configs/quickstart_cpu.yaml", *shlex.split(extra.get("ARGS", ""))])
    elif program in ("python", "python3"):
        check_python_command(arguments, monkeypatch)
    elif program == "fw-lora-glue":
        check_glue_command(arguments)
    elif program == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        assert arguments[0] == "launch", words
        launch = launch_command_parser().parse_args(arguments[1:])
        assert launch.config_file is None or (ROOT / launch.config_file).is_file(), launch.config_file
        check_python_command([launch.training_script, *launch.training_script_args], monkeypatch)
    elif program == "torchrun":
        from torch.distributed.run import get_args_parser

        launch = get_args_parser().parse_args(arguments)
        check_under_torchrun([launch.training_script, *launch.training_script_args])
    elif program == "pip":
        assert arguments[0] == "install", words
        for requirement in arguments[1:]:
            extras = re.fullmatch(r"(?:fw-lora|\.)\[([\w,]+)\]", requirement)
            if extras:
                assert set(extras.group(1).split(",")) <= setup_extras(), requirement
    elif program == "tensorboard":
        assert arguments[0] == "--logdir", words
    else:
        raise AssertionError(f"No rule checks the command {shlex.join(words)}: add one to this test.")
