"""The GLUE script's logging, set up as run_glue.py sets it up: info on the main process, each process's device and
precision as a warning."""

import logging
import sys

import datasets
import transformers
from transformers import TrainingArguments


logger = logging.getLogger(__name__)


def setup_logging(training_args: TrainingArguments) -> None:
    """Logging as in run_glue.py: info on the main process, the process's device and precision as a warning."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # The default of training_args.log_level is passive, so we set log level at info here to have that default.
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logging.getLogger("fw_trainer").setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank: {training_args.local_process_index}, device: {training_args.device}, n_gpu: "
        f"{training_args.n_gpu}, distributed training: {training_args.parallel_mode.value == 'distributed'}, "
        f"16-bits training: {training_args.fp16}, bf16: {training_args.bf16}"
    )
