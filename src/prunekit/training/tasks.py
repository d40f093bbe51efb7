"""Tasks: what the loop trains and measures (loss, metric, evaluation)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from prunekit.training.device import device_of, to_device


class ClassificationTask:
    """Cross-entropy classification on ``(inputs, labels)`` batches; metric: accuracy (%)."""

    metric = "accuracy"

    def step(self, model: nn.Module, batch) -> tuple[Tensor, Tensor]:
        x, y = batch
        out = model(x)
        return nn.functional.cross_entropy(out, y), out

    def batch_size(self, batch) -> int:
        return len(batch[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        was = model.training
        model.eval()
        correct = total = 0
        loss = 0.0
        dev = device_of(model)
        for batch in loader:
            x, y = to_device(batch, dev)
            out = model(x)
            loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
        model.train(was)
        return {"accuracy": 100.0 * correct / max(total, 1), "loss": loss / max(total, 1), "examples": total}

    def logits(self, outputs) -> Tensor:
        return outputs


def causal_lm_nll(model: nn.Module, batch: dict) -> tuple[Tensor, int, object]:
    """``(summed NLL, predicted tokens, outputs)`` of a batch of token windows: every position predicts the
    next token (``input_ids[:, 1:]``); positions whose ``attention_mask`` is 0 are not predicted."""
    ids = batch["input_ids"]
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits = out.logits if hasattr(out, "logits") else out
    tgt = ids[:, 1:]
    if "attention_mask" in batch:
        tgt = tgt.masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                                      ignore_index=-100, reduction="sum")
    return nll, int((tgt != -100).sum()), out


class CausalLMTask:
    """Next-token prediction on token windows (``{"input_ids": (B, L)}``); metric: perplexity per token
    ``exp(Σ NLL / tokens)`` on the evaluation windows — **lower is better** (``lower_is_better``)."""

    metric = "perplexity"
    lower_is_better = True

    def step(self, model: nn.Module, batch: dict) -> tuple[Tensor, object]:
        nll, n, out = causal_lm_nll(model, batch)
        return nll / max(n, 1), out

    def batch_size(self, batch: dict) -> int:
        return len(batch["input_ids"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        was = model.training
        model.eval()
        tot, n = 0.0, 0
        dev = device_of(model)
        if dev.type == "meta":      # dispatched by accelerate with weights offloaded: its hooks move the inputs
            dev = torch.device("cpu")
        for batch in loader:
            nll, k, _ = causal_lm_nll(model, to_device(batch, dev))
            tot, n = tot + float(nll), n + k
        model.train(was)
        mean = tot / max(n, 1)
        return {"perplexity": math.exp(mean), "loss": mean, "tokens": n}

    def logits(self, outputs) -> Tensor:
        return outputs.logits if hasattr(outputs, "logits") else outputs


def better(task: object, new: float, old: float) -> bool:
    """Whether metric value ``new`` beats ``old`` for ``task`` (``task.lower_is_better``, default higher)."""
    return new < old if getattr(task, "lower_is_better", False) else new > old
