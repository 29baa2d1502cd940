"""Generic access to Hugging Face decoder-only models (Llama, Mistral, Qwen2 and alike).

Nothing here is model-specific: decoder layers are found as the ModuleList that holds
``config.num_hidden_layers`` blocks, block-0 inputs are captured by intercepting the first
layer's call (so whatever the model passes — attention mask, position ids, rotary
``position_embeddings`` — is captured verbatim), and blocks are run with those keyword args.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from efficientqat.errors import ModelLoadError


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``{"dtype": ...}`` for transformers >= 4.56, ``{"torch_dtype": ...}`` before (renamed there)."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
EMBEDDED_PREFIX = "embedded:"


def resolve_path(path: str) -> str:
    """Turn ``embedded:NAME`` into the packaged asset path; leave other paths and hub ids alone."""
    if path.startswith(EMBEDDED_PREFIX):
        return str(ASSETS_DIR / path[len(EMBEDDED_PREFIX) :])
    return os.path.expanduser(path)


def is_local_path(path: str) -> bool:
    """A path the user meant as a file or folder (as opposed to a hub id like ``org/name``)."""
    return path.startswith(("/", ".", "~")) or os.path.exists(path) or path.startswith(str(ASSETS_DIR))


def check_model_source(path: str) -> str:
    """Resolve ``path`` and fail early, naming it, if a local model folder is missing or incomplete."""
    resolved = resolve_path(path)
    if is_local_path(resolved):
        folder = Path(resolved)
        if not folder.is_dir():
            raise ModelLoadError(f"model path '{path}' does not exist or is not a folder")
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"model path '{path}' has no config.json: not a Hugging Face model folder")
    return resolved


def load_causal_lm(path: str, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """Load a causal LM on the CPU in ``dtype``; errors name the path and the cause."""
    from transformers import AutoModelForCausalLM

    resolved = check_model_source(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved, trust_remote_code=trust_remote_code, **dtype_kwarg(dtype)
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load model '{path}': {err}") from err
    model.config.use_cache = False
    return model.eval()


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer that belongs to the model at ``path``."""
    from transformers import AutoTokenizer

    resolved = check_model_source(path)
    try:
        return AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the tokenizer of '{path}': {err}") from err


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks (the one with ``num_hidden_layers`` entries)."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers:
            return module
    raise ModelLoadError(
        f"could not find the decoder layers of {type(model).__name__}: no ModuleList of "
        f"num_hidden_layers={n_layers} blocks"
    )


def linear_modules(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a block, by qualified name (these are the layers we quantize)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@functools.cache
def with_mixin(mixin: type, cls: type) -> type:
    """``Fused<cls>``: a subclass of ``cls`` with ``mixin`` first in its bases, one per pair (so
    isinstance checks and pickling see one class). How the fused decode paths replace a module's
    forward while keeping its parameters, state dict and exports: ``module.__class__ = ...``."""
    return type(f"Fused{cls.__name__}", (mixin, cls), {"__module__": mixin.__module__})


def move_non_layer_modules(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Move embeddings, rotary embedding, final norm and head to ``device``; blocks stay where they are."""
    layer_params = {id(p) for p in layers.parameters()} | {id(b) for b in layers.buffers()}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in layer_params:
                param.data = param.data.to(device)
        for name, buf in list(module.named_buffers(recurse=False)):
            if id(buf) not in layer_params:
                module._buffers[name] = buf.to(device)


class _StopForward(Exception):
    """Raised by the capture hook once block 0 has been called."""


class _InputCatcher(nn.Module):
    """Stands in for block 0: records what the model passes to it, then stops the forward."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.hidden: torch.Tensor | None = None
        self.kwargs: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # models may read attributes of the layer (e.g. attention_type)
            return getattr(self.layer, name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise ModelLoadError("decoder layer called with positional arguments beyond hidden_states; unsupported model")
        self.hidden = hidden_states
        self.kwargs = kwargs
        raise _StopForward


def capture_block_inputs(
    model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 1
) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """Yield (block-0 hidden states, block kwargs) for each batch of token ``windows``.

    Kwargs that are caches are dropped; everything else (masks, positions, rotary tables)
    is kept as the model produced it, on ``device``.
    """
    layers = decoder_layers(model)
    catcher = _InputCatcher(layers[0])
    layers[0] = catcher
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            kwargs = {k: v for k, v in catcher.kwargs.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
            yield catcher.hidden, kwargs
    finally:
        layers[0] = catcher.layer


def batch_kwargs(kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
    """Adapt captured batch-1 kwargs to a batch of ``batch``: expand a 4-D attention mask.

    Rotary tables and position ids broadcast over the batch; an explicit mask may not, so
    it is expanded (a view, no copy).
    """
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[0] == 1 and batch > 1:
        kwargs = dict(kwargs, attention_mask=mask.expand(batch, *mask.shape[1:]))
    return kwargs


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Run one decoder block; returns the hidden states whatever the transformers version returns."""
    out = block(hidden, **batch_kwargs(kwargs, hidden.shape[0]))
    return out[0] if isinstance(out, (tuple, list)) else out


def kwargs_to(kwargs: dict[str, Any], device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Move tensors (and tuples of tensors, e.g. rotary cos/sin) in block kwargs to a device/dtype.

    Only floating tensors change dtype; integer tensors (positions) keep theirs.
    """

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if dtype is not None and value.is_floating_point():
                return value.to(device=device, dtype=dtype)
            return value.to(device)
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    return {k: move(v) for k, v in kwargs.items()}
