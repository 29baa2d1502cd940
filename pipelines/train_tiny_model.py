#!/usr/bin/env python
"""Train the tiny Llama that ``efficientqat`` ships as its default model.

Why this exists: the quantization pipeline needs a causal LM that lives in the
repository, loads offline with ``AutoModelForCausalLM``/``AutoTokenizer`` and
is small enough that ``python -m efficientqat.blockap`` quantizes it on a
CPU-only machine in a few minutes.  Real checkpoints are far too large for
that, so we train our own ~1.2M-parameter LlamaForCausalLM on a public-domain
text sample (King James Bible, see ``efficientqat/assets/text/SOURCE.md``).

Steps (each can be run on its own):

1. ``--build-text``: dump the KJV text with Debian's ``bible`` CLI
   (``apt-get install bible-kjv``), strip verse numbers / headings, write one
   verse per line and split by whole books into ``train.txt`` (Genesis ..
   1 Kings) and ``heldout.txt`` (2 Kings, never trained on).
2. Train a byte-level BPE tokenizer (vocab 2048) on ``train.txt``.
3. Train the model from scratch on ``train.txt`` (seeded, CPU, fixed steps).
4. Save in Hugging Face layout (float16) plus ``reference.json`` with the
   training setup and FP32 perplexities, which later quantization runs are
   compared against.

Regenerate everything (text, tokenizer, model; 1000 steps at ~0.39 s/step,
about 7 minutes on 2 otherwise idle CPU cores)::

    python pipelines/train_tiny_model.py --build-text --steps 1000
    python pipelines/train_tiny_model.py --measure 10   # only time a step, save nothing
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO = Path(__file__).resolve().parents[1]
TEXT_DIR = REPO / "efficientqat" / "assets" / "text"
MODEL_DIR = REPO / "efficientqat" / "assets" / "tiny-llama"

# Whole books, in canonical order.  The training text is Genesis .. 1 Kings
# (~1.39 MB); the held-out text is the *next* book, 2 Kings (~0.12 MB, ~8%),
# so held-out perplexity is measured on a contiguous tail never seen in training.
TRAIN_RANGE = "gen1:1-1ki22:53"
HELDOUT_RANGE = "2ki1:1-2ki25:30"
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]


# --------------------------------------------------------------------------- text
def dump_verses(spec: str) -> list[str]:
    """Return the verses of ``spec`` as plain lines, via Debian's ``bible`` CLI.

    ``-l100000`` disables line wrapping so each verse is one line of the form
    ``"  12 text"``; chapter headings ("Genesis 1") and blank lines are dropped.
    """
    raw = subprocess.run(
        ["bible", "-l100000", spec], check=True, capture_output=True, text=True
    ).stdout
    verses = []
    for line in raw.splitlines():
        m = re.match(r"^\s+\d+ (.*\S)\s*$", line)
        if m:
            verses.append(re.sub(r"\s+", " ", m.group(1)))
    return verses


def build_text(text_dir: Path) -> None:
    """Write train.txt / heldout.txt (one verse per line, UTF-8, trailing newline)."""
    text_dir.mkdir(parents=True, exist_ok=True)
    for name, spec in (("train.txt", TRAIN_RANGE), ("heldout.txt", HELDOUT_RANGE)):
        verses = dump_verses(spec)
        path = text_dir / name
        path.write_text("\n".join(verses) + "\n", encoding="utf-8")
        print(f"{path}: {len(verses)} verses, {path.stat().st_size} bytes")


# ---------------------------------------------------------------------- tokenizer
def train_tokenizer(train_file: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style): no <unk> is ever needed, any text round-trips."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # ids 0..3 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(train_file)], trainer)
    # No post-processor: tokenizer(text) adds no <s>, matching how the model was
    # trained (plain token stream) and how perplexity is measured.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=512,
    )


def encode_file(tokenizer: PreTrainedTokenizerFast, path: Path) -> torch.Tensor:
    """The whole file as one token stream (text joined exactly as in the file)."""
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# -------------------------------------------------------------------------- model
def make_config(vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """hidden 128, 4 layers, 4 q heads / 2 kv heads (GQA), intermediate 384.

    head_dim is set to 64 (not hidden/heads = 32) so that *every* Linear has
    in/out features that are multiples of 128 (q/o: 128<->256, k/v: 128->128,
    MLP: 128<->384), i.e. group sizes 32/64/128 all divide them, while q and
    k/v projections still have different shapes.
    """
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def lr_at(step: int, steps: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up, then cosine decay from ``peak`` to ``floor``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, ids: torch.Tensor, ctx: int,
               max_windows: int | None = None, batch: int = 16) -> float:
    """PPL over non-overlapping ``ctx``-token windows (tail shorter than ctx dropped)."""
    model.eval()
    n = len(ids) // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    windows = ids[: n * ctx].view(n, ctx)
    nll, count = 0.0, 0
    for i in range(0, n, batch):
        x = windows[i : i + batch]
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def train(model: LlamaForCausalLM, data: torch.Tensor, args: argparse.Namespace,
          steps: int) -> float:
    """AdamW on random ``ctx``-token crops of the train stream; returns seconds."""
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    model.train()
    t0 = time.time()
    for step in range(steps):
        lr = lr_at(step, steps, args.warmup, args.lr, args.lr * 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - args.ctx - 1, (args.batch,), generator=gen)
        x = torch.stack([data[s : s + args.ctx] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            el = time.time() - t0
            print(f"step {step:5d}/{steps} loss {loss.item():.4f} lr {lr:.2e} "
                  f"{el:7.1f}s ({el / (step + 1):.3f}s/step)", flush=True)
    return time.time() - t0


# --------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build-text", action="store_true",
                   help="regenerate train.txt/heldout.txt from the `bible` CLI first")
    p.add_argument("--text-dir", type=Path, default=TEXT_DIR)
    p.add_argument("--out", type=Path, default=MODEL_DIR)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--measure", type=int, default=0,
                   help="only time this many training steps, print s/step, save nothing")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.build_text:
        build_text(args.text_dir)
    train_file, heldout_file = args.text_dir / "train.txt", args.text_dir / "heldout.txt"

    tokenizer = train_tokenizer(train_file, args.vocab)
    train_ids = encode_file(tokenizer, train_file)
    heldout_ids = encode_file(tokenizer, heldout_file)
    print(f"tokens: train {len(train_ids)}, heldout {len(heldout_ids)} "
          f"({train_file.stat().st_size / len(train_ids):.2f} bytes/token)")

    torch.manual_seed(args.seed)
    config = make_config(len(tokenizer), tokenizer)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    print(f"params: {n_params}")

    if args.measure:
        secs = train(model, train_ids, args, args.measure)
        per = secs / args.measure
        print(f"{per:.3f} s/step -> {int(480 / per)} steps in 8 min")
        return

    seconds = train(model, train_ids, args, args.steps)
    ppl = {
        "heldout_fp32": perplexity(model, heldout_ids, args.ctx),
        "train_first200_fp32": perplexity(model, train_ids, args.ctx, max_windows=200),
    }
    # What the shipped checkpoint actually holds: fp16-rounded weights, evaluated in fp32.
    model.to(torch.float16).to(torch.float32)
    ppl["heldout_fp16_weights"] = perplexity(model, heldout_ids, args.ctx)
    print(json.dumps(ppl, indent=1))

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16)
    model.config.dtype = torch.float16
    model.save_pretrained(args.out)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    reference = {
        "description": "tiny LlamaForCausalLM trained from scratch by pipelines/train_tiny_model.py",
        "text": {"train": str(train_file.relative_to(REPO)) if train_file.is_relative_to(REPO) else str(train_file),
                 "heldout": str(heldout_file.relative_to(REPO)) if heldout_file.is_relative_to(REPO) else str(heldout_file),
                 "train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids)},
        "training": {"steps": args.steps, "batch": args.batch, "ctx": args.ctx,
                     "tokens_seen": args.steps * args.batch * args.ctx,
                     "seconds": round(seconds, 1), "threads": args.threads, "seed": args.seed,
                     "optimizer": "AdamW(b=(0.9,0.95)), warmup+cosine",
                     "lr_peak": args.lr, "lr_floor": args.lr * 0.1, "warmup": args.warmup,
                     "weight_decay": args.weight_decay, "grad_clip": 1.0,
                     "torch": torch.__version__},
        "param_count": n_params,
        "perplexity": {"windows": f"non-overlapping {args.ctx}-token windows, no BOS, "
                                  "tail < ctx dropped; train = first 200 windows",
                       **{k: round(v, 3) for k, v in ppl.items()}},
    }
    (args.out / "reference.json").write_text(json.dumps(reference, indent=2) + "\n")
    for f in sorted(args.out.iterdir()):
        print(f"{f.stat().st_size:9d}  {f}")


if __name__ == "__main__":
    main()
