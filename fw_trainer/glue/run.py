"""
Fine-tunes an encoder on GLUE (or your own csv/json files) with LoRA, AdaLoRA, FW-LoRA or full fine-tuning:
`fw-lora-glue`, `python -m fw_trainer.glue.run` and the repository's `run_glue_fw.py` all run [`main`]. A mirror of
transformers' `run_glue.py`: [`run`] follows its `main()` section by section (docs/glue_script.md lists what differs,
and why).
"""

import logging
import os
import random
import sys
from contextlib import nullcontext
from typing import Optional

from datasets import DatasetDict
from transformers import (
    DataCollatorWithPadding,
    PretrainedConfig,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from ..arguments import FWLoraArguments
from ..errors import USER_FAULTS, CheckpointError, UsageError
from ..measurement import peak_memory_mb, reset_peak_memory
from ..model_builder import build_peft_model
from ..run_environment import write_run_environment
from ..trainer import FWLoraTrainer
from .arguments import DataTrainingArguments, ModelArguments, ScriptArguments, padding_multiple, parse_args, run_data
from .completion import PHASES, invalidate_completion, write_completion
from .divergence import TrainingDivergedError, divergence_advice, metrics_divergence, training_divergence
from .hpo import run_hyperparameter_search
from .logging_setup import setup_logging
from .metrics import PRIMARY_GLUE_METRIC, metric_function, predicted_labels
from .preflight import check_training_setup
from .pretrained import check_sequence_length, load_model, load_pretrained, resolve_model_path
from .raw_datasets import labels_of, load_raw_datasets, sentence_keys
from .run_directory import OutputDirectoryLock, check_writable, checkpoint_to_resume, missing_directories
from .run_outputs import (
    print_report,
    print_search_report,
    write_adapter_summary,
    write_delta_weight_norms,
    write_eval_predictions,
    write_predict_results,
)
from .write_failures import reported_write_failures


logger = logging.getLogger(__name__)

RELABELLED = "label_id"
# The exit status of a run that diverged (2 is bad input): a sweep does not retry it.
DIVERGED_EXIT_STATUS = 3


def main(argv: Optional[list[str]] = None) -> int:
    """
    Runs the script on `argv` (default: the command line), holding its output directory ([`OutputDirectoryLock`]).
    This is the one place where the faults a user can cause become an `error:` paragraph: the library's
    [`USER_FAULTS`] (bad arguments or files, a checkpoint that cannot be resumed, a directory in use, a warm-up that
    diverged) and a run that diverged. Any other exception is a bug and keeps its traceback.

    Returns:
        `int`: The exit status: 0; 2 after bad input, with the output directory left as it was (the directories the
        run created are removed again while empty); [`DIVERGED_EXIT_STATUS`] after a run whose final training loss or
        dev metrics are not finite, its files kept for inspection. Either is reported as one `error: ...` paragraph on
        standard error.
    """
    created, output_dir = [], "."
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        output_dir, training_args = args[-1].output_dir, args[-1]
        check_writable(output_dir)
        created = missing_directories(output_dir)
        # The main process holds the directory for all (the others write nothing of their own there).
        lock = OutputDirectoryLock(output_dir) if training_args.process_index == 0 else nullcontext()
        # A write that finds no room (a full disk) ends in a paragraph, not in a library's traceback.
        with reported_write_failures(output_dir), lock:
            run(*args)
    except (*USER_FAULTS, TrainingDivergedError) as error:
        message = str(error)
        if isinstance(error, CheckpointError):
            message += (
                " For a new run instead, leave out --resume_from_checkpoint and pass --overwrite_output_dir (or "
                "another --output_dir)."
            )
        for directory in created:
            if os.path.isdir(directory) and not os.listdir(directory):
                os.rmdir(directory)
        # One paragraph, whatever line breaks the underlying library put into its message.
        print("error: " + " ".join(message.split()), file=sys.stderr)
        return DIVERGED_EXIT_STATUS if isinstance(error, TrainingDivergedError) else 2
    return 0


def run(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    fw_args: FWLoraArguments,
    script_args: ScriptArguments,
    training_args: TrainingArguments,
) -> None:
    """run_glue.py's `main()`, section by section. The method adds calls into `fw_trainer`: `build_peft_model`,
    `FWLoraTrainer`, the writers of `run_outputs` and `measurement`; `--hpo_trials` searches instead of training."""
    # Setup logging
    setup_logging(training_args)
    for default in script_args.applied_defaults:
        logger.info(default)
    logger.info(f"Method parameters {fw_args}")

    # Detecting last checkpoint.
    last_checkpoint = checkpoint_to_resume(
        training_args.output_dir,
        script_args.overwrite_output_dir,
        training_args.resume_from_checkpoint,
        training_args.do_train,
    )

    # Set seed before initializing model.
    set_seed(training_args.seed)

    # Get the datasets: a GLUE task (from --glue_dir, else the Hub), a Hub dataset, or your own csv/json files.
    raw_datasets = load_raw_datasets(model_args, data_args, training_args.do_predict)

    # Labels
    label_list = labels_of(raw_datasets, data_args.task_name)
    is_regression = label_list is None
    num_labels = 1 if is_regression else len(label_list)

    # Load pretrained model and tokenizer
    model_path = resolve_model_path(model_args)
    config, tokenizer, model = load_pretrained(model_args, model_path, num_labels, data_args.task_name)

    # Preprocessing the raw_datasets
    sentence1_key, sentence2_key = sentence_keys(raw_datasets, data_args.task_name)

    # Padding strategy: by default each batch is padded to its longest sequence by the data collator.
    padding = "max_length" if data_args.pad_to_max_length else False

    # Some models have set the order of the labels to use, so let's make sure we do use it.
    label_to_id = None
    if (
        model.config.label2id != PretrainedConfig(num_labels=num_labels).label2id
        and data_args.task_name is not None
        and not is_regression
    ):
        label_name_to_id = {k.lower(): v for k, v in model.config.label2id.items()}
        if sorted(label_name_to_id) == sorted(label_list):
            label_to_id = {i: int(label_name_to_id[label_list[i]]) for i in range(num_labels)}
        else:
            logger.warning(
                "Your model seems to have been trained with labels, but they don't match the dataset: model labels: "
                f"{sorted(label_name_to_id)}, dataset labels: {sorted(label_list)}.\nIgnoring the model labels as a "
                "result."
            )
    elif data_args.task_name is None and not is_regression:
        label_to_id = {v: i for i, v in enumerate(label_list)}

    if label_to_id is not None:
        model.config.label2id = label_to_id
        model.config.id2label = {id: label for label, id in config.label2id.items()}
    elif data_args.task_name is not None and not is_regression:
        model.config.label2id = {label: i for i, label in enumerate(label_list)}
        model.config.id2label = {id: label for label, id in config.label2id.items()}

    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(
            f"The max_seq_length passed ({data_args.max_seq_length}) is larger than the maximum length for the "
            f"model ({tokenizer.model_max_length}). Using max_seq_length={tokenizer.model_max_length}."
        )
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    check_sequence_length(max_seq_length, config)

    def preprocess_function(examples):
        # Tokenize the texts
        texts = (
            (examples[sentence1_key],) if sentence2_key is None else (examples[sentence1_key], examples[sentence2_key])
        )
        result = tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)
        # Map labels to IDs (not necessary for GLUE tasks)
        if label_to_id is not None and "label" in examples:
            # An unlabelled test file has `label` -1 (GLUE) or missing (None, from a csv/json without the column).
            result[RELABELLED] = [-1 if label in (-1, None) else label_to_id[label] for label in examples["label"]]
        return result

    def tokenize(dataset):
        relabel = label_to_id is not None and "label" in dataset.column_names
        dataset = dataset.map(
            preprocess_function,
            batched=True,
            load_from_cache_file=not data_args.overwrite_cache,
            remove_columns=["label"] if relabel else None,
            desc="Running tokenizer on dataset",
        )
        # Under a new name, then renamed: `map` keeps the old feature type (e.g. string) of a column it overwrites.
        return dataset.rename_column(RELABELLED, "label") if relabel else dataset

    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw_datasets = DatasetDict({split: tokenize(dataset) for split, dataset in raw_datasets.items()})

    def take(split: str, limit: Optional[int]):
        dataset = raw_datasets[split]
        return dataset.select(range(min(len(dataset), limit))) if limit is not None else dataset

    train_dataset = eval_dataset = predict_dataset = None
    if training_args.do_train:
        if "train" not in raw_datasets:
            raise UsageError("--do_train requires a train dataset.")
        if data_args.shuffle_train_dataset:
            # A fixed random subset for `max_train_samples` rather than the file's first rows.
            raw_datasets["train"] = raw_datasets["train"].shuffle(seed=data_args.shuffle_seed)
        train_dataset = take("train", data_args.max_train_samples)

    if training_args.do_eval:
        eval_split = "validation_matched" if data_args.task_name == "mnli" else "validation"
        if eval_split not in raw_datasets:
            raise UsageError("--do_eval requires a validation dataset.")
        eval_dataset = take(eval_split, data_args.max_eval_samples)

    if training_args.do_predict:
        predict_split = "test_matched" if data_args.task_name == "mnli" else "test"
        if predict_split not in raw_datasets:
            raise UsageError(
                "--do_predict requires a test dataset: GLUE_DIR/<task>/test.tsv (test_matched.tsv for MNLI), the "
                "Hub's test split, or --test_file."
            )
        predict_dataset = take(predict_split, data_args.max_predict_samples)

    # Log a few random samples from the training set:
    if training_args.do_train:
        for index in random.sample(range(len(train_dataset)), min(3, len(train_dataset))):
            logger.info(f"Sample {index} of the training set: {train_dataset[index]}.")

    # Get the metric function: the GLUE metrics computed offline, or a metric from the Hub with --metric_name.
    compute_metrics = metric_function(data_args.task_name, is_regression, data_args.metric_name, model_args.cache_dir)

    # Data collator: stacks samples padded to max length already, else pads each batch to its longest sequence.
    if data_args.pad_to_max_length:
        data_collator = default_data_collator
    else:
        data_collator = DataCollatorWithPadding(
            tokenizer, pad_to_multiple_of=padding_multiple(data_args, training_args)
        )

    # The method: adapters (or full fine-tuning) on the pretrained model, described in adapter_summary.json.
    model, summary = build_peft_model(model, fw_args)
    logger.info("Adapter summary:\n%s", summary.format())

    # Initialize our Trainer
    trainer = FWLoraTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=data_collator,
        fw_args=fw_args,
        run_data=run_data(data_args, max_seq_length),
    )

    # Before anything is written: the checkpoint to resume from is this run's (`train()` does not check it again),
    # and training can start.
    checkpoint = None
    if training_args.do_train:
        if not script_args.hpo_trials:  # a search trains its trials from scratch
            checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        if checkpoint is not None:
            trainer.check_resume(checkpoint, weights_only=script_args.resume_weights_only)
        check_training_setup(trainer)
    if training_args.should_save:
        invalidate_completion(training_args.output_dir)  # the first write: a run cut short from here is not finished
        write_adapter_summary(training_args.output_dir, summary)
    advice = divergence_advice(training_args.learning_rate, training_args.max_grad_norm, training_args.fp16)

    # Hyper-parameter search (--hpo_trials): the trials are the run; no final model is trained.
    if script_args.hpo_trials:

        def build_model(method_args: FWLoraArguments):
            # A fresh pretrained model per trial, adapted with the trial's method arguments (rank, ...).
            return build_peft_model(load_model(model_args, model_path, config), method_args)[0]

        metric = PRIMARY_GLUE_METRIC.get(data_args.task_name) or ("mse" if is_regression else "accuracy")
        results = run_hyperparameter_search(
            trainer,
            build_model,
            script_args.hpo_trials,
            f"eval_{metric}",
            training_args.output_dir,
            script_args.hpo_sampler_seed,
        )
        print_search_report(results)
        if trainer.is_world_process_zero():
            write_completion(training_args.output_dir, ["hpo"])
        return

    # Training (a search above trains its trials from scratch)
    if training_args.do_train:
        reset_peak_memory(training_args.device)
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        metrics["train_peak_memory_mb"], metrics["train_peak_memory_kind"] = peak_memory_mb(training_args.device)
        metrics["adapter_params"] = summary.adapter_params
        metrics["adapter_percent"] = summary.adapter_percent

        trainer.save_model()  # Saves the tokenizer too for easy upload
        if fw_args.uses_lora and trainer.is_world_process_zero():
            write_delta_weight_norms(training_args.output_dir, trainer.model)
        if trainer.is_world_process_zero():
            # The size of what was just saved, and where it trained.
            write_run_environment(training_args.output_dir, training_args.device, training_args.world_size)

        trainer.log_metrics("train", metrics)
        # A run that diverged keeps its files but is not finished: it gets no all_results.json.
        diverged = training_divergence(metrics, trainer.state.log_history, advice, trainer.model)
        trainer.save_metrics("train", metrics, combined=diverged is None)
        trainer.save_state()
        if diverged is not None:
            raise diverged

    # Evaluation
    eval_metrics = {}
    if training_args.do_eval:
        logger.info("*** Evaluate ***")

        # Loop to handle MNLI double evaluation (matched, mis-matched)
        tasks = [data_args.task_name]
        eval_datasets = [eval_dataset]
        if data_args.task_name == "mnli":
            tasks.append("mnli-mm")
            eval_datasets.append(take("validation_mismatched", data_args.max_eval_samples))

        for eval_dataset, task in zip(eval_datasets, tasks):
            # `trainer.evaluate()`, keeping the predictions for eval_predictions_{task}.tsv: the same `eval_*` metrics
            # from one pass, logged as `evaluate` logs them (TensorBoard's `eval/...`).
            output = trainer.predict(eval_dataset, metric_key_prefix="eval")
            metrics = output.metrics
            trainer.log(metrics)
            metrics["eval_samples"] = len(eval_dataset)

            if task == "mnli-mm":
                metrics = {k + "_mm": v for k, v in metrics.items()}
            eval_metrics.update(metrics)

            trainer.log_metrics("eval", metrics)
            if trainer.is_world_process_zero():
                predictions = predicted_labels(output.predictions, is_regression)
                write_eval_predictions(training_args.output_dir, task, predictions, output.label_ids, is_regression)
        diverged = metrics_divergence(eval_metrics, "final dev metrics", advice)
        trainer.save_metrics("eval", eval_metrics, combined=diverged is None)
        if diverged is not None:
            raise diverged

    if training_args.do_predict:
        logger.info("*** Predict ***")

        # Loop to handle MNLI double evaluation (matched, mis-matched)
        tasks = [data_args.task_name]
        predict_datasets = [predict_dataset]
        if data_args.task_name == "mnli":
            tasks.append("mnli-mm")
            predict_datasets.append(take("test_mismatched", data_args.max_predict_samples))

        for predict_dataset, task in zip(predict_datasets, tasks):
            # Removing the `label` columns because it contains -1 and Trainer won't like that.
            if "label" in predict_dataset.column_names:
                predict_dataset = predict_dataset.remove_columns("label")
            predictions = trainer.predict(predict_dataset, metric_key_prefix="predict").predictions
            predictions = predicted_labels(predictions, is_regression)
            if trainer.is_world_process_zero():
                logger.info(f"***** Predict results {task} *****")
                write_predict_results(training_args.output_dir, task, predictions, label_list)

    kwargs = {"finetuned_from": model_path, "tasks": "text-classification"}
    if data_args.task_name is not None:
        kwargs["language"] = "en"
        kwargs["dataset_tags"] = "glue"
        kwargs["dataset_args"] = data_args.task_name
        kwargs["dataset"] = f"GLUE {data_args.task_name.upper()}"

    trainer.push_to_hub(**kwargs) if training_args.push_to_hub else trainer.create_model_card(**kwargs)

    # The dev metrics and, for FW-LoRA and IW-LoRA, the frozen importances, on standard output; then, as the run's
    # last file, the record that it finished every phase it was asked for.
    warmup = trainer.fisher_callback
    if trainer.is_world_process_zero():
        frozen = warmup is not None and warmup.frozen
        print_report(
            eval_metrics, warmup.format_table() if frozen else None, warmup.frozen_at_step if frozen else None
        )
        write_completion(training_args.output_dir, [name for name, on in PHASES.items() if getattr(training_args, on)])


if __name__ == "__main__":
    sys.exit(main())
