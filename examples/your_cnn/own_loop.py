"""prunekit.Pruner in a hand-written training loop: ADMM toward 50% channels on mynet, then hard-pruned
further training and verified compaction (random data: this checks the mechanics, not accuracy).

    python own_loop.py
"""
import torch, torch.nn.functional as F
import prunekit
from mynet import build
torch.manual_seed(0)
model = build(10, 16)
x = torch.randn(256, 1, 28, 28); y = torch.randint(0, 10, (256,))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
pruner = prunekit.Pruner(model, {"structure": "channels", "sparsity": 0.5}, opt, algorithm="admm",
                         params={"rho": 0.01}, example_inputs=x[:1])
for epoch in range(2):
    for i in range(0, 256, 32):
        xb, yb = x[i:i+32], y[i:i+32]
        out = model(xb)
        loss = pruner.loss(F.cross_entropy(out, yb), (xb, yb), out)
        opt.zero_grad(); loss.backward(); opt.step(); pruner.step()
    pruner.epoch_end()
masks = pruner.finalize(opt)
for i in range(0, 256, 32):
    out = model(x[i:i+32]); loss = F.cross_entropy(out, y[i:i+32]); opt.zero_grad(); loss.backward(); opt.step()
print("sparsity", round(masks.sparsity(), 4), "zeros kept:", all(bool((p[~masks[n]] == 0).all()) for n, p in model.named_parameters() if n in masks))
res = prunekit.compact(model, masks, x[:2])
print("params", res.params_before, "->", res.params_after, "rel_err", res.rel_err)
