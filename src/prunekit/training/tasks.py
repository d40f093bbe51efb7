"""Tasks: what the loop trains and measures (loss, metric, evaluation)."""
from __future__ import annotations

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
