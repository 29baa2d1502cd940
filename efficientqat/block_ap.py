"""Block-AP over a whole model: block after block, resumable after any finished block.

For block i the two activation chains hold the block's inputs: the FP chain (outputs of the
original blocks 0..i-1) and the quantized chain (outputs of the packed blocks 0..i-1).
The FP block turns the FP chain into its targets in place (which are also block i+1's FP
inputs), the fake-quant copy trains on the quantized chain against them, is packed, and
turns the quantized chain into block i+1's quantized inputs. Only block i is on the GPU.

A run resumes at the first unfinished block: the packed blocks are reloaded and the chains
are restored from the activation snapshot of that block if one was written, else recomputed
by running the finished blocks again (same batches, same kernels, hence the same values).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from efficientqat.activations import ActivationStore, choose_location
from efficientqat.block_trainer import (
    BlockTrainConfig,
    make_fake_quant_block,
    pack_block,
    should_compile,
    train_block,
)
from efficientqat.model_utils import (
    capture_block_inputs,
    decoder_layers,
    kwargs_to,
    move_non_layer_modules,
    run_block,
)
from efficientqat.packed_model import convert_block_to_packed_
from efficientqat.quantizer import QuantSpec
from efficientqat.run_folder import RunFolder, atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActivationConfig:
    """Where the two chains live and whether a snapshot is written after each block."""

    location: str = "auto"  # gpu | cpu | disk | auto
    snapshot: str = "auto"  # always | never | auto (when both chains fit in max_snapshot_gb)
    max_snapshot_gb: float = 4.0
    propagate_batch_size: int = 4


class Chains:
    """The FP and quantized activation chains for the train and validation windows."""

    def __init__(self, n_train: int, n_val: int, seqlen: int, hidden: int, dtype: torch.dtype,
                 location: str, device: torch.device, run: RunFolder) -> None:
        def store(name: str, n: int) -> ActivationStore:
            return ActivationStore(n, seqlen, hidden, dtype, location, device, run.ckpt / f"work_{name}.bin")

        self.stores = {
            "fp_train": store("fp_train", n_train),
            "q_train": store("q_train", n_train),
            "fp_val": store("fp_val", n_val),
            "q_val": store("q_val", n_val),
        }

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.stores.values())

    def propagate(self, block: nn.Module, prefix: str, kwargs: dict[str, Any], batch_size: int) -> None:
        """Replace the ``prefix`` chain (fp or q) by ``block``'s output on it, batch by batch."""
        with torch.no_grad():
            for split in ("train", "val"):
                store = self.stores[f"{prefix}_{split}"]
                for start in range(0, len(store), batch_size):
                    rows = slice(start, min(start + batch_size, len(store)))
                    store.write(start, run_block(block, store.read(rows), kwargs))

    def save(self, path: Any) -> None:
        with atomic_path(path) as tmp:
            save_file({k: s.state_tensor().contiguous() for k, s in self.stores.items()}, str(tmp))

    def load(self, path: Any) -> None:
        values = load_file(str(path))
        for name, store in self.stores.items():
            store.load_tensor(values[name])


def quantize_model_block_ap(
    model: nn.Module,
    train_windows: torch.Tensor,
    val_windows: torch.Tensor,
    spec: QuantSpec,
    train_cfg: BlockTrainConfig,
    act_cfg: ActivationConfig,
    run: RunFolder,
    device: torch.device,
    dtype: torch.dtype,
    on_block_done: Callable[[dict[str, Any]], None] = lambda stats: None,
    on_epoch: Callable[[dict[str, Any]], None] = lambda stats: None,
) -> nn.Module:
    """Quantize every decoder block of ``model`` (on the CPU) with Block-AP; returns it packed."""
    layers = decoder_layers(model)
    move_non_layer_modules(model, layers, device)
    seqlen = train_windows.shape[1]
    hidden = model.config.hidden_size
    n_train, n_val = train_windows.shape[0], val_windows.shape[0]
    elem = torch.empty((), dtype=dtype).element_size()
    chain_bytes = 2 * (n_train + n_val) * seqlen * hidden * elem
    location = choose_location(act_cfg.location, chain_bytes, device)
    snapshot = act_cfg.snapshot == "always" or (
        act_cfg.snapshot == "auto" and chain_bytes <= act_cfg.max_snapshot_gb * 2**30
    )
    log.info("activations: %.2f GB in %s, snapshots %s", chain_bytes / 2**30, location, "on" if snapshot else "off")
    chains = Chains(n_train, n_val, seqlen, hidden, dtype, location, device, run)

    kwargs: dict[str, Any] = {}
    for split, windows in (("train", train_windows), ("val", val_windows)):
        row = 0
        for hidden_states, kw in capture_block_inputs(model, windows, device, act_cfg.propagate_batch_size):
            for prefix in ("fp", "q"):
                chains.stores[f"{prefix}_{split}"].write(row, hidden_states)
            row += hidden_states.shape[0]
            kwargs = kw
    kwargs = kwargs_to(kwargs, device)
    bs = act_cfg.propagate_batch_size

    start = run.next_block
    snap = run.snapshot_file(start)
    resume_from_snapshot = start > 0 and snap.exists()
    for i in range(start):  # resume: reload finished blocks, rebuild the chains if needed
        packed = convert_block_to_packed_(copy.deepcopy(layers[i]).to(dtype), spec, dtype)
        packed.load_state_dict(load_file(str(run.block_file(i))))
        if not resume_from_snapshot:
            chains.propagate(layers[i].to(device), "fp", kwargs, bs)
            chains.propagate(packed.to(device), "q", kwargs, bs)
        layers[i] = packed.cpu()
    if resume_from_snapshot:
        chains.load(snap)
    if start:
        log.info("resumed at block %d of %d (%s)", start, len(layers),
                 "from snapshot" if resume_from_snapshot else "chains recomputed")

    for i in range(start, len(layers)):
        block = layers[i].to(device)
        chains.propagate(block, "fp", kwargs, bs)  # FP chain now holds block i's targets
        qblock = make_fake_quant_block(block, spec, should_compile(block, train_cfg.compile, device)).to(device)
        layers[i] = block.cpu()
        result = train_block(
            qblock, i, chains.stores["q_train"], chains.stores["fp_train"], chains.stores["q_val"],
            chains.stores["fp_val"], kwargs, train_cfg, on_epoch,
        )
        packed = pack_block(qblock, dtype)
        chains.propagate(packed, "q", kwargs, bs)
        layers[i] = packed.cpu()
        with atomic_path(run.block_file(i)) as tmp:
            save_file({k: v.contiguous() for k, v in layers[i].state_dict().items()}, str(tmp))
        if snapshot:
            chains.save(run.snapshot_file(i + 1))
        stats = asdict(result)
        run.commit(next_block=i + 1, blocks=run.state["blocks"][:i] + [stats])
        if snapshot and run.snapshot_file(i).exists():
            run.snapshot_file(i).unlink()
        log.info("block %d: val loss %.3e -> %.3e, %.1f s, peak %.2f GB", i, result.init_val_loss,
                 result.val_loss[-1] if result.val_loss else float("nan"), result.seconds, result.peak_memory_gb)
        on_block_done(stats)
    for store in chains.stores.values():
        if store.location == "disk":
            del store.data
    for f in run.ckpt.glob("work_*.bin"):
        f.unlink()
    return model.cpu()
