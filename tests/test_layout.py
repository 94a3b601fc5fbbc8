"""The package's architecture, read from its imports: a core that any training loop can use, GLUE support and the
study harness on top of it, matplotlib only where a figure is drawn, no import cycle, rooms of a readable size."""

import ast
import importlib.metadata
import inspect
import subprocess
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "fw_trainer"
# The modules that draw figures, and so import matplotlib.
FIGURE_MODULES = {"fw_trainer.heatmap", "fw_trainer.study.figures"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level: bool = True) -> set[str]:
    """Absolute names of the modules that `path` imports: when it is imported, or anywhere (`top_level=False`)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body if top_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            names.add(prefix)
            names |= {f"{prefix}.{alias.name}" for alias in node.names}
    return names


PATHS = {module_name(path): path for path in PACKAGE.rglob("*.py")}
MODULES = {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}
# With the imports made inside functions, which a direction between layers must not have either.
ALL_IMPORTS = {module_name(path): imports(path, top_level=False) for path in PACKAGE.rglob("*.py")}


def is_core(name: str) -> bool:
    return not name.startswith(("fw_trainer.glue", "fw_trainer.study"))


def test_core_imports_neither_glue_nor_the_study():
    for name, imported in ALL_IMPORTS.items():
        if is_core(name):
            assert not [i for i in imported if not is_core(i) and i.startswith("fw_trainer")], name


def test_glue_does_not_import_the_study():
    for name, imported in ALL_IMPORTS.items():
        if name.startswith("fw_trainer.glue"):
            assert not [i for i in imported if i.startswith("fw_trainer.study")], name


def test_matplotlib_only_where_a_figure_is_drawn():
    drawing = {name for name, imported in MODULES.items() if any(i.startswith("matplotlib") for i in imported)}
    assert drawing == FIGURE_MODULES
    code = "import sys, fw_trainer, fw_trainer.glue; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_no_import_cycle():
    # Imports inside functions and under `TYPE_CHECKING` count: a cycle hidden there is still two modules that need
    # each other.
    graph = {name: {i for i in imported if i in MODULES and i != name} for name, imported in ALL_IMPORTS.items()}
    # A package imports its submodules through `__init__`; a cycle through a package's own `__init__` is not one.
    for name in graph:
        graph[name] = {i for i in graph[name] if not name.startswith(i + ".")}
    visiting, done = set(), set()

    def visit(node, path):
        assert node not in visiting, " -> ".join([*path, node])
        if node in done:
            return
        visiting.add(node)
        for child in graph[node]:
            visit(child, [*path, node])
        visiting.discard(node)
        done.add(node)

    for node in graph:
        visit(node, [])


def test_no_module_over_400_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in PATHS.items()}
    assert {name: size for name, size in sizes.items() if size > 400} == {}


def test_no_module_shares_its_name_with_a_package_attribute():
    # `fw_trainer.x` must be one thing: a module `x.py` and a function `x` exported by `__init__` would shadow each
    # other.
    import fw_trainer

    for name in MODULES:
        package, _, leaf = name.rpartition(".")
        if package:
            attribute = getattr(__import__(package, fromlist=[leaf]), leaf, None)
            assert attribute is None or inspect.ismodule(attribute), name
    assert not {name for name in fw_trainer.__all__ if f"fw_trainer.{name}" in MODULES}


def test_version_has_one_source_that_the_package_metadata_reads():
    import fw_trainer

    assert fw_trainer.__version__ == importlib.metadata.version("fw-lora")
    # Nothing imports it back up from `__init__` (a module of the package reading its own package).
    assert not [name for name, imported in ALL_IMPORTS.items() if "fw_trainer.__version__" in imported]


def test_a_source_checkout_that_is_not_installed_imports_and_names_its_version(tmp_path):
    """`PYTHONPATH=/path/to/checkout python run_glue_fw.py ...` (a checkout used without `pip install`) has no package
    metadata for fw-lora: importing the package and writing a run identity must not need it."""
    script = f"""
import importlib.metadata, sys
real_version = importlib.metadata.version
def version(name):
    if name == "fw-lora":
        raise importlib.metadata.PackageNotFoundError(name)
    return real_version(name)
importlib.metadata.version = version
sys.path.insert(0, {str(PACKAGE.parent)!r})
import fw_trainer
from fw_trainer.study.code_revision import code_revision
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
arguments = (fw_trainer.FWLoraArguments(method="full"), TrainingArguments(output_dir={str(tmp_path)!r}))
identity = fw_trainer.run_identity(BertForSequenceClassification(config), *arguments)
print(fw_trainer.__version__, identity["environment"]["fw-lora"], code_revision({str(tmp_path)!r})["fw-lora"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = importlib.metadata.version("fw-lora")
    assert done.stdout.split() == [expected] * 3
