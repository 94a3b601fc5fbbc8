"""Under `--torch_compile`, fw-lora compiles its own small functions (the estimator's arithmetic, the penalty's
gradient) with the backend the Trainer compiles the model with: [`compile_backend`] is that choice, made once."""

from typing import Optional

from transformers import TrainingArguments


def compile_backend(args: TrainingArguments) -> Optional[str]:
    """The `torch.compile` backend of the run (`--torch_compile_backend`, else torch's default, inductor), or `None`
    when the model is not compiled (`--torch_compile` off): fw-lora then runs its functions eagerly too."""
    if not args.torch_compile:
        return None
    return args.torch_compile_backend or "inductor"
