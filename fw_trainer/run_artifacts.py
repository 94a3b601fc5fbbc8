"""
The files a run writes into its output directory (and its checkpoints), named in one place: the script and the
callbacks write them under these names, the study harness reads them back.
"""

# Written by the Fisher warm-up callback into the output directory and every checkpoint.
IMPORTANCE_FILE = "fw_importance.json"
# Written by the AdaLoRA callback at the end of training.
RANK_PATTERN_FILE = "adalora_rank_pattern.json"
# Written by `run_glue_fw.py`.
ADAPTER_SUMMARY_FILE = "adapter_summary.json"
# ‖ΔW‖_F per adapted matrix at the end of training: where each method put its capacity.
DELTA_WEIGHT_NORMS_FILE = "delta_weight_norms.json"
# Per dev example: index, gold label id (or score) and prediction of the final model, for McNemar's test and the
# confusion matrix.
EVAL_PREDICTIONS_FILE = "eval_predictions_{task}.tsv"
# transformers' `save_metrics("all", ...)`: written last, so its presence marks a finished run.
ALL_RESULTS_FILE = "all_results.json"
