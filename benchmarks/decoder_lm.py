"""A small GPT-2-style causal LM (4 layers, width 128, MiniLM's WordPiece vocabulary; ~4.7M parameters) trained
briefly on SST-2 training sentences; held-out perplexity on the SST-2 dev sentences.  Used by
``benchmarks/posttraining.py --part decoder``.  The trained weights are cached under the given folder."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prunekit.adapters.hf import load_tokenizer
from prunekit.data.paths import resolve_data_root


def _sentences(split: str, limit: int | None, seed: int = 0) -> list[str]:
    path = Path(resolve_data_root(None)) / "glue" / "SST-2" / f"{split}.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    sents = [ln.split("\t")[0] for ln in lines if ln.strip()]
    if limit is not None and limit < len(sents):
        sents = random.Random(seed).sample(sents, limit)
    return sents


class _Collate:
    def __init__(self, pad: int):
        self.pad = pad

    def __call__(self, items: list[list[int]]) -> dict:
        n = max(len(x) for x in items)
        ids = torch.full((len(items), n), self.pad, dtype=torch.long)
        mask = torch.zeros(len(items), n, dtype=torch.long)
        for i, x in enumerate(items):
            ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class LMTask:
    metric = "perplexity"

    @staticmethod
    def loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = model(**batch)
        logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
        tgt = labels[:, 1:].reshape(-1)
        n = int((tgt != -100).sum())
        return nn.functional.cross_entropy(logits, tgt, ignore_index=-100, reduction="sum"), n

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict:
        was = model.training
        model.eval()
        tot, n = 0.0, 0
        for b in loader:
            l, k = self.loss(model, b)
            tot, n = tot + float(l), n + k
        model.train(was)
        return {"perplexity": math.exp(tot / max(n, 1)), "tokens": n}


@dataclass
class LMWorkload:
    model: nn.Module
    task: LMTask
    train_loader: object
    eval_loader: object


def decoder_workload(cache: Path, epochs: int = 1, limit: int = 8000, max_length: int = 64) -> LMWorkload:
    import transformers
    tok = load_tokenizer("minilm-l6")
    def enc(ss: list[str]) -> list[list[int]]:
        return [tok(s, truncation=True, max_length=max_length)["input_ids"] for s in ss]

    train, dev = enc(_sentences("train", limit)), enc(_sentences("dev", None))
    collate = _Collate(tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    train_loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, generator=g, collate_fn=collate)
    eval_loader = torch.utils.data.DataLoader(dev, batch_size=128, collate_fn=collate)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=128, n_layer=4, n_head=4, n_positions=max_length)
    model = transformers.GPT2LMHeadModel(cfg)
    path = Path(cache) / f"gpt2_tiny_sst2_e{epochs}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path))
    else:
        _train(model, train_loader, epochs)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return LMWorkload(model.eval(), LMTask(), train_loader, eval_loader)


def _train(model: nn.Module, loader, epochs: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.0, 1 - s / total))
    model.train()
    for ep in range(epochs):
        for i, b in enumerate(loader):
            l, n = LMTask.loss(model, b)
            (l / n).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            if i % 50 == 0:
                print(f"decoder epoch {ep} step {i}/{len(loader)} loss {float(l) / n:.3f}", flush=True)
