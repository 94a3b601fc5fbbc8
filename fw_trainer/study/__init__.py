"""The research harness: sweeps over methods × budgets × seeds (`python -m fw_trainer.study.sweep`), their
aggregation with statistics and figures (`python -m fw_trainer.study.aggregate`), and hyper-parameter search."""
