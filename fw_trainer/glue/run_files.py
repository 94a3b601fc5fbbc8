"""The names of what a GLUE run writes into its output directory: what `--overwrite_output_dir` removes
(`run_directory.py`) and what the completion record lists (`completion.py`), one list for both."""

# transformers' `save_metrics(..., combined=True)`: the run's results (not a sign that it finished: see
# `completion.py`).
ALL_RESULTS_FILE = "all_results.json"
# Held by the run writing into the directory: its process id, host and start.
LOCK_FILE = "fw_run.lock"
# What a run writes into its output directory, by name pattern: the files of the Trainer, the model (or adapter) and
# tokenizer, the GLUE script and fw-lora, checkpoints, TensorBoard events (`runs/`) and search trials (`run-<n>`).
# `--overwrite_output_dir` removes these and nothing else.
RUN_OUTPUTS = (
    "checkpoint-*",
    "runs",
    "run-*",
    "*_results.json",
    "trainer_state.json",
    "training_args.bin",
    "predict_results_*.txt",
    "eval_predictions_*.tsv",
    "fw_importance.json",
    "fw_run_identity.json",
    "adalora_rank_pattern.json",
    "adapter_summary.json",
    "delta_weight_norms.json",
    "run_environment.json",
    "hpo_results.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "adapter_config.json",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spm.model",
    "sentencepiece.bpe.model",
    "README.md",
    "run_complete.json",
    ".tmp-*.json",
)
