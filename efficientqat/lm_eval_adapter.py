"""Zero-shot accuracy of an in-memory model through lm-evaluation-harness (``pip install .[eval]``).

The model (e.g. from :func:`efficientqat.load_quantized`, packed layers and all) and its
tokenizer are handed to lm-eval's ``HFLM`` as objects, so what is evaluated is exactly the
model in memory — no re-loading through a quantizer lm-eval would pick itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn

from efficientqat.errors import ConfigError

STANDARD_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")


def zero_shot_accuracy(
    model: nn.Module, tokenizer: Any, tasks: tuple[str, ...] | list[str] = STANDARD_TASKS, batch_size: int = 8,
    limit: int | None = None, task_paths: list[str] | None = None,
) -> dict[str, float]:
    """``acc`` per task (0-shot). ``task_paths``: extra folders of task YAMLs (local data)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ConfigError("lm-evaluation-harness is not installed: pip install 'efficientqat[eval]'") from err
    with _quant_config_hidden(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=task_paths) if task_paths else TaskManager()
    results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit, task_manager=manager)
    return {task: float(metrics["acc,none"]) for task, metrics in results["results"].items() if "acc,none" in metrics}


@contextmanager
def _quant_config_hidden(model: nn.Module) -> Iterator[None]:
    """Hide ``config.quantization_config`` while HFLM is built: HFLM (lm-eval 0.4.x) parses a dict
    quantization config with transformers' ``AutoQuantizationConfig``, which rejects
    ``quant_method: efficientqat`` although the model is already loaded and needs no quantizer."""
    config = getattr(model, "config", None)
    saved = getattr(config, "quantization_config", None)
    if saved is not None:
        del config.quantization_config
    try:
        yield
    finally:
        if saved is not None:
            config.quantization_config = saved
