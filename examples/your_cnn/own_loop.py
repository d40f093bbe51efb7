"""prunekit.Pruner in a hand-written training loop: ADMM toward 50% channels on mynet, then hard-pruned
further training and verified compaction (random data: this checks the mechanics, not accuracy).

    python own_loop.py
"""
import torch
import torch.nn.functional as F
from mynet import build

import prunekit


def train_epoch(model, opt, x, y, pruner=None):
    for i in range(0, len(x), 32):
        xb, yb = x[i:i + 32], y[i:i + 32]
        out = model(xb)
        loss = F.cross_entropy(out, yb)
        if pruner is not None:
            loss = pruner.loss(loss, (xb, yb), out)          # + the ADMM penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        if pruner is not None:
            pruner.step()                                    # re-mask, schedules, multipliers


def main():
    torch.manual_seed(0)
    model = build(10, 16)
    x, y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = prunekit.Pruner(model, {"structure": "channels", "sparsity": 0.5}, opt, algorithm="admm",
                             params={"rho": 0.01}, example_inputs=x[:1])
    for _ in range(2):
        train_epoch(model, opt, x, y, pruner)
        pruner.epoch_end()
    masks = pruner.finalize(opt)                             # hard-prune; masks stay attached
    train_epoch(model, opt, x, y)
    params = dict(model.named_parameters())
    zeros_kept = all(bool((params[n][~m] == 0).all()) for n, m in masks.items())
    print("sparsity", round(masks.sparsity(), 4), "zeros kept:", zeros_kept)
    res = prunekit.compact(model, masks, x[:2])
    print("params", res.params_before, "->", res.params_after, "rel_err", res.rel_err)


if __name__ == "__main__":
    main()
