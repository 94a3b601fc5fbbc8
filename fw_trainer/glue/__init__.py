"""GLUE without the Hub: the original TSV layout read into the Hub's splits, and evaluate's GLUE metrics offline."""

from .data import GLUE_LABEL_NAMES, TASK_TO_KEYS, glue_dir_from_env, load_glue_dir
from .metrics import GLUE_METRIC_NAMES, PRIMARY_GLUE_METRIC, combined_score, glue_metric


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
