"""Shared fixtures: tiny random Llama / Mistral / Qwen2 models with a real tokenizer, and text files.

Everything is built locally in a temporary folder (no hub), small enough that a full Block-AP
run takes seconds on the CPU.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter. The variable must be set before *triton*
    # is first imported by anything (accelerate, peft and lm-eval import it while test modules
    # are collected): triton.language's own jit helpers (tl.zeros, ...) are built in the mode
    # of that first import, and compiled-mode helpers fail inside interpreted kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(2)

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven bright stars shine above quiet hills and "
    "rivers carry old stories into the sea where sailors sing of distant lands and patient farmers "
    "watch their fields grow green under the warm summer rain"
).split()


def make_text(n_words: int, seed: int) -> str:
    """Pseudo-sentences with some structure (a tiny Markov chain over WORDS), deterministic."""
    rng = random.Random(seed)
    out, prev = [], 0
    for i in range(n_words):
        prev = (prev + rng.choice([1, 1, 2, 3, 5])) % len(WORDS)
        out.append(WORDS[prev])
        if i % 12 == 11:
            out.append(".\n")
    return " ".join(out)


def build_tokenizer(folder: Path, text: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, arch: str, vocab: int, seed: int = 0) -> None:
    """Save a randomly initialised 2-layer model of the given family (hidden 64, MLP 128)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False)
    config = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch](**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a little structure so quantization error is not uniform noise
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(1 + torch.rand(p.shape[0], 1) * 3)
    model.save_pretrained(folder)


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text")
    files = {"train": root / "train.txt", "heldout": root / "heldout.txt", "docs": root / "docs.jsonl"}
    files["train"].write_text(make_text(30000, 1))
    files["heldout"].write_text(make_text(4000, 2))
    import json

    with open(files["docs"], "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"text": make_text(300, 100 + i), "id": i}) + "\n")
    return files


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory, text_files):
    """model_factory(arch) -> folder with a tiny random model of that family and a trained tokenizer."""
    cache: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in cache:
            folder = tmp_path_factory.mktemp(f"model-{arch}")
            tok = build_tokenizer(folder, text_files["train"].read_text())
            build_model(folder, arch, len(tok))
            cache[arch] = folder
        return cache[arch]

    return make


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def has_cuda_toolchain() -> bool:
    """Whether the installed Triton ships ptxas, so kernels compile for a GPU on this machine."""
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def run_compiled(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``pipelines/<name>.py args`` in a process without ``TRITON_INTERPRET``: it compiles kernels
    for sm_90 with Triton's own toolchain, as the interpreter running the other tests never does."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(PIPELINES / f"{name}.py"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def load_pipeline(name: str):
    """``pipelines/<name>.py`` as a module (pipelines are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, PIPELINES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# not pip-installed (a bare GPU box): efficientqat.kernels mapped onto ./kernels, as for the pipelines
load_pipeline("checkout_paths")


def compose(config_name: str, overrides: list[str]):
    """The Hydra config exactly as the CLI would build it, without running the app."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from efficientqat.settings import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


@pytest.fixture
def tiny_overrides(model_factory, text_files):
    """Overrides that point Block-AP at a tiny random model and the test text, CPU-sized."""

    def make(arch: str = "llama", quant: str = "w4g128") -> list[str]:
        return [
            "model=hf", f"model.path={model_factory(arch)}", f"quant={quant}", "quant.group_size=32",
            "device=cpu", f"data.source={text_files['train']}", "data.n_train=16", "data.n_val=4",
            "data.seqlen=64", "train.epochs=2", "train.batch_size=4", "eval.seqlen=64",
            f"eval.sets.heldout.source={text_files['heldout']}", "wandb.mode=disabled",
        ]

    return make


def random_packed_model(vocab: int, spec: QuantSpec, seed: int = 0):
    """A tiny Llama whose decoder Linears are PackedLinear over random codes, extreme zeros."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from efficientqat.model_utils import decoder_layers, linear_modules, set_submodule
    from efficientqat.qlinear import PackedLinear

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).float()
    for block in decoder_layers(model):
        for name, linear in linear_modules(block).items():
            n, k = linear.weight.shape
            g = spec.n_groups(k)
            codes = torch.randint(0, spec.qmax + 1, (n, k), dtype=torch.int32)
            codes[0, :] = 0  # code extremes too
            codes[1, :] = spec.qmax
            zero = torch.where(torch.rand(n, g) < 0.5, 0, spec.qmax).to(torch.int32)
            scale = torch.rand(n, g) * 0.02 / spec.qmax + 1e-3
            set_submodule(block, name, PackedLinear.from_codes(codes, scale, zero, None, spec, torch.float32))
    return model
