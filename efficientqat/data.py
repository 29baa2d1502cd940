"""Text data for calibration and evaluation, read through ``datasets``.

A *source* is either a hub alias (``wikitext2``, ``c4``, ``redpajama``: for users with
internet), a local file (json, jsonl, json.gz, txt, parquet, csv), or ``embedded:PATH`` for
text shipped inside the package. Documents are joined with a separator into one token
stream; calibration draws non-overlapping random windows from it (seeded), evaluation cuts it
into consecutive non-overlapping windows (the GPTQ perplexity protocol).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from efficientqat.errors import DataError
from efficientqat.model_utils import is_local_path, resolve_path

# Hub datasets as (path, config name, split, data_files) for datasets.load_dataset.
HUB_SOURCES: dict[str, tuple[str, str | None, str, dict[str, str] | None]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", None),
    "wikitext2-train": ("wikitext", "wikitext-2-raw-v1", "train", None),
    "c4": ("allenai/c4", None, "validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"}),
    "c4-train": ("allenai/c4", None, "train", {"train": "en/c4-train.00000-of-01024.json.gz"}),
    "redpajama": ("togethercomputer/RedPajama-Data-1T-Sample", None, "train", None),
}

LOCAL_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
    ".parquet": "parquet",
    ".csv": "csv",
}


@dataclass(frozen=True)
class TextSource:
    """Where documents come from, which field holds the text, and which documents to use."""

    source: str
    field: str = "text"
    docs: str | None = None  # python slice "start:stop" over documents, e.g. "0:1500"
    separator: str = "\n\n"


def _builder_for(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    builder = LOCAL_BUILDERS.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise DataError(f"data file '{path}' has an unsupported type; use one of {sorted(LOCAL_BUILDERS)}")
    return builder


def _doc_slice(docs: str | None) -> slice:
    if not docs:
        return slice(None)
    try:
        parts = [int(p) if p.strip() else None for p in str(docs).split(":")]
        return slice(*parts)
    except (TypeError, ValueError):
        raise DataError(f"docs='{docs}' is not a slice like '0:1500' or '1500:'") from None


def load_documents(src: TextSource) -> list[str]:
    """Read the documents of ``src`` (local file or hub alias) as a list of strings."""
    import datasets

    resolved = resolve_path(src.source)
    try:
        if src.source in HUB_SOURCES:
            path, name, split, files = HUB_SOURCES[src.source]
            ds = datasets.load_dataset(path, name, split=split, data_files=files)
        elif is_local_path(resolved):
            file = Path(resolved)
            if not file.is_file():
                raise DataError(f"data file '{src.source}' does not exist")
            ds = datasets.load_dataset(_builder_for(file), data_files=str(file), split="train")
        else:
            ds = datasets.load_dataset(resolved, split="train")
    except DataError:
        raise
    except Exception as err:  # datasets raises many types for unreadable files or unreachable hubs
        raise DataError(f"could not read data source '{src.source}': {type(err).__name__}: {err}") from err
    if src.field not in ds.column_names:
        raise DataError(f"data source '{src.source}' has no field '{src.field}' (fields: {ds.column_names})")
    docs = ds[src.field][_doc_slice(src.docs)]
    if Path(resolved).suffix == ".txt" or ".txt" in Path(resolved).suffixes:
        # the text builder yields one row per line: rejoin lines, keep paragraph breaks
        return ["\n".join(docs)]
    return [d for d in docs if d is not None]


def token_stream(src: TextSource, tokenizer: Any) -> torch.Tensor:
    """All documents joined by the separator, tokenized once, as a 1-D LongTensor."""
    text = src.separator.join(load_documents(src))
    if not text.strip():
        raise DataError(f"data source '{src.source}' (docs {src.docs or 'all'}) holds no text")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids.long()


def calibration_windows(
    src: TextSource, tokenizer: Any, n_train: int, n_val: int, seqlen: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random non-overlapping windows of ``seqlen`` tokens: (train [n_train, L], val [n_val, L]).

    Windows are drawn without replacement from the slots of the token stream (with a random
    offset), so train and validation never share tokens.
    """
    ids = token_stream(src, tokenizer)
    needed = n_train + n_val
    gen = torch.Generator().manual_seed(seed)
    n_slots = ids.numel() // seqlen
    if n_slots < needed:
        raise DataError(
            f"calibration data '{src.source}' has {ids.numel()} tokens = {n_slots} windows of {seqlen}, "
            f"but n_train + n_val = {n_train} + {n_val} = {needed} were requested; "
            "use more documents, fewer windows or a shorter seqlen"
        )
    spare = ids.numel() - n_slots * seqlen
    offset = int(torch.randint(0, spare + 1, (1,), generator=gen))
    slots = torch.randperm(n_slots, generator=gen)[:needed]
    windows = ids[offset : offset + n_slots * seqlen].view(n_slots, seqlen)[slots]
    return windows[:n_train].clone(), windows[n_train:].clone()


def eval_windows(src: TextSource, tokenizer: Any, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows ``[n, seqlen]`` of the joined text (GPTQ protocol)."""
    ids = token_stream(src, tokenizer)
    n = ids.numel() // seqlen
    if n == 0:
        raise DataError(f"evaluation data '{src.source}' has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)
