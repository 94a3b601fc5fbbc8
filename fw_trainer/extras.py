"""The optional parts of fw-lora and what each needs: `import fw_trainer` needs torch, transformers, peft and
accelerate only; the GLUE script, the study harness, trl's SFT trainer and 4-bit bases come with extras
(`pip install "fw-lora[glue]"`, ...). [`require_extra`] turns a missing one into an `ImportError` that says which."""

import importlib.util
from collections.abc import Sequence


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The top-level `modules` that cannot be imported here."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


def require_extra(feature: str, extra: str, modules: Sequence[str]) -> None:
    """
    Raises an `ImportError` naming `feature`, the modules it lacks and the extra that installs them, if any of
    `modules` is missing.

    Args:
        feature (`str`): What needs them, e.g. "The GLUE script (fw_trainer.glue)".
        extra (`str`): fw-lora's extra that installs them, e.g. `"glue"`.
        modules (`Sequence[str]`): The top-level modules to import (`"sklearn"`, not `"scikit-learn"`).
    """
    missing = missing_modules(modules)
    if missing:
        raise ImportError(
            f'{feature} needs {", ".join(missing)}, not installed here: `pip install "fw-lora[{extra}]"` installs '
            f"{'it' if len(missing) == 1 else 'them'}. The method itself (`import fw_trainer`: the trainers, the "
            "estimator, the penalty) needs torch, transformers, peft and accelerate only."
        )
