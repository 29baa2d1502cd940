"""Training data for E2E-QP: pretraining text packed into context windows, or Alpaca instructions.

Both kinds become :class:`Examples` (token ids and labels per example, labels ``-100`` where a
token is not scored), so the trainer needs no knowledge of where the data came from. Text goes
through :mod:`efficientqat.data` (local files, hub aliases, embedded text); Alpaca files
(``instruction``, ``input``, ``output``) are read with ``datasets`` and their prompts are
masked out of the loss, as in the published instruction-tuning recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from efficientqat.data import token_stream
from efficientqat.errors import ConfigError, DataError
from efficientqat.model_utils import resolve_path
from efficientqat.settings import text_source

IGNORE_INDEX = -100
ALPACA_FIELDS = ("instruction", "input", "output")
# The Stanford Alpaca prompts (also used by QLoRA and the EfficientQAT E2E-QP scripts).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)


@dataclass(frozen=True)
class Examples:
    """Tokenized examples of varying length; ``labels[i]`` is ``input_ids[i]`` with unscored tokens at -100."""

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.input_ids)

    def scored_tokens(self, indices: list[int]) -> int:
        """Tokens that contribute to the next-token loss (labels shifted by one), to normalise it."""
        return int(sum(int((self.labels[i][1:] != IGNORE_INDEX).sum()) for i in indices))

    def batch(self, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for these examples."""
        length = max(self.input_ids[i].numel() for i in indices)
        ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
        labels = torch.full((len(indices), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(indices), length), dtype=torch.long)
        for row, i in enumerate(indices):
            n = self.input_ids[i].numel()
            ids[row, :n], labels[row, :n], mask[row, :n] = self.input_ids[i], self.labels[i], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _split(examples: list[tuple[torch.Tensor, torch.Tensor]], n_val: int, max_samples: int | None,
           source: str) -> tuple[Examples, Examples]:
    """The last ``n_val`` examples validate; the first ``max_samples`` of the rest train."""
    if len(examples) <= n_val:
        raise DataError(f"E2E data '{source}' gives {len(examples)} examples, but n_val={n_val} "
                        "leaves none to train on; use more data or a smaller n_val / context")
    train = examples[: len(examples) - n_val][: max_samples or None]
    val = examples[len(examples) - n_val :]
    return (Examples([e[0] for e in train], [e[1] for e in train]),
            Examples([e[0] for e in val], [e[1] for e in val]))


def text_examples(node: Any, tokenizer: Any) -> tuple[Examples, Examples]:
    """Documents joined into one token stream, cut into consecutive windows of ``context`` tokens."""
    context = int(node.context)
    if context < 2:
        raise ConfigError(f"e2e_data.context={context} must be at least 2")
    ids = token_stream(text_source(node), tokenizer)
    windows = ids[: ids.numel() // context * context].view(-1, context)
    return _split([(w, w) for w in windows], int(node.n_val), node.get("max_samples"), str(node.source))


def _load_alpaca(source: str) -> Any:
    import datasets

    path = resolve_path(source)
    try:
        if Path(path).exists():
            return datasets.load_dataset("json", data_files=path, split="train")
        if path.startswith(("/", ".", "~")):
            raise DataError(f"instruction data file '{source}' does not exist")
        return datasets.load_dataset(path, split="train")
    except DataError:
        raise
    except Exception as err:  # datasets raises many types for unreadable files or unreachable hubs
        raise DataError(f"could not read instruction data '{source}': {type(err).__name__}: {err}") from err


def alpaca_examples(node: Any, tokenizer: Any) -> tuple[Examples, Examples]:
    """Prompt (BOS + template, cut to ``source_max_len``) + response (+ EOS, cut to ``target_max_len``);
    only the response is scored."""
    ds = _load_alpaca(str(node.source))
    missing = [f for f in ALPACA_FIELDS if f not in ds.column_names]
    if missing:
        raise DataError(f"instruction data '{node.source}' lacks Alpaca fields {missing} (has {ds.column_names})")
    src_max, tgt_max = int(node.source_max_len), int(node.target_max_len)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for row in ds:
        template = ALPACA_PROMPT if row["input"] else ALPACA_PROMPT_NO_INPUT
        prompt = bos + tokenizer(template.format(**row), add_special_tokens=False).input_ids
        target = tokenizer(row["output"], add_special_tokens=False).input_ids + eos
        prompt, target = prompt[:src_max], target[:tgt_max]
        if not target:
            continue
        ids = torch.tensor(prompt + target, dtype=torch.long)
        labels = torch.tensor([IGNORE_INDEX] * len(prompt) + target, dtype=torch.long)
        examples.append((ids, labels))
    return _split(examples, int(node.n_val), node.get("max_samples"), str(node.source))


LOADERS = {"text": text_examples, "alpaca": alpaca_examples}


def load_e2e_data(node: Any, tokenizer: Any) -> tuple[Examples, Examples]:
    """(train, validation) examples for the ``e2e_data`` config group."""
    kind = str(node.format)
    if kind not in LOADERS:
        raise ConfigError(f"e2e_data.format='{kind}' must be one of {sorted(LOADERS)}")
    return LOADERS[kind](node, tokenizer)
