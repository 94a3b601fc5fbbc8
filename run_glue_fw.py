#!/usr/bin/env python
"""
Fine-tunes an encoder on GLUE (or your own csv/json files) with LoRA, AdaLoRA, FW-LoRA or full fine-tuning: the
checkout's entry point to `fw_trainer.glue.run`, which is the same script as the installed `fw-lora-glue` command.
The code, a mirror of transformers' `run_glue.py` section by section, is in `fw_trainer/glue/run.py`.

    # the quick start on a CPU: the embedded all-MiniLM-L6-v2, SST-2 from GLUE_DIR (else the Hub)
    GLUE_DIR=/path/to/glue python run_glue_fw.py configs/quickstart_cpu.yaml
    # no --do_train/--do_eval/--do_predict: trains and evaluates, into outputs/sst2-fw_lora
    python run_glue_fw.py --task_name sst2 --method fw_lora --bf16 --use_cpu
    # one run of the study on a GPU
    python run_glue_fw.py configs/sst2_fw_lora_0.2.yaml
    accelerate launch --config_file configs/accelerate_multi_gpu.yaml run_glue_fw.py configs/sst2_fw_lora_0.2.yaml
    tensorboard --logdir outputs
"""

import sys

from fw_trainer.glue.run import main


if __name__ == "__main__":
    sys.exit(main())
