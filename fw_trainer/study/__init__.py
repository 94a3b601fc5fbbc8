"""The research harness: sweeps over methods × budgets × seeds (`python -m fw_trainer.study.sweep`), their
aggregation with statistics and figures (`python -m fw_trainer.study.aggregate`). Its dependencies are the `study`
extra: `pip install "fw-lora[study]"`."""

from ..extras import require_extra


# The study runs the GLUE script and reads its outputs: the `study` extra includes the `glue` one.
require_extra("The study harness (fw_trainer.study)", "study", ["datasets", "sklearn", "scipy", "matplotlib", "yaml"])
