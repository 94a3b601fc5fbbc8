"""The GLUE script (`run_glue_fw.py`, `fw-lora-glue`): transformers' run_glue.py with the method's arguments, GLUE read
offline from its original TSV layout, evaluate's GLUE metrics computed locally, and what a run records. Its
dependencies are the `glue` extra: `pip install "fw-lora[glue]"`."""

from ..extras import require_extra


require_extra("The GLUE script (fw_trainer.glue)", "glue", ["datasets", "sklearn", "scipy", "yaml"])

from .metrics import GLUE_METRIC_NAMES, PRIMARY_GLUE_METRIC, combined_score, glue_metric  # noqa: E402
from .tsv_layout import GLUE_LABEL_NAMES, TASK_TO_KEYS, glue_dir_from_env, load_glue_dir  # noqa: E402


__all__ = [
    "GLUE_LABEL_NAMES",
    "GLUE_METRIC_NAMES",
    "PRIMARY_GLUE_METRIC",
    "TASK_TO_KEYS",
    "combined_score",
    "glue_dir_from_env",
    "glue_metric",
    "load_glue_dir",
]
