"""`prunekit run` (channel pruning: a group structure) → `prunekit compact` (graph-driven) → `prunekit bench`,
as a user runs them."""
from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import torch

from prunekit.cli.compact import load_run
from prunekit.cli.main import main
from prunekit.deploy.compact import load_compacted
from prunekit.models.registry import get_model


def _cli(*args) -> tuple[int, str]:
    """``prunekit ARGS`` in this process (one torch import for the whole file): (exit code, stdout)."""
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setenv("PRUNEKIT_NO_PROGRESS", "1")
        rc = main(list(args))
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def run_and_compact(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    out = tmp_path_factory.mktemp("compacted")
    rc, _ = _cli("run", "recipes/lenet5_oneshot.yaml", "--set", "data.limit=300", "--set", "train.epochs=0.2",
             "--set", "dense.epochs=0.2", "--set", "retrain.epochs=0.2", "--set", "prune.structure=channels+neurons",
             "--set", "prune.sparsity=0.5", "--out", str(run))
    assert rc == 0
    rc, stdout = _cli("compact", str(run), "--out", str(out))
    assert rc == 0
    return run, out, stdout


def _kept_rows(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1).any(1).nonzero().reshape(-1)


def test_compacted_param_count_is_the_hand_count_from_kept_rows(run_and_compact):
    run, out, stdout = run_and_compact
    _, masks, _, _ = load_run(run)
    k1, k2, k3 = (int(_kept_rows(masks[f"{n}.weight"]).numel()) for n in ("conv1", "conv2", "fc1"))
    assert (k1, k2, k3) == (10, 25, 250)              # channel sparsity 0.5 of 20 / 50 / 500 units
    # conv1: k1 filters of 1x5x5 (+bias); conv2: k2 filters over k1 input channels; fc1: k3 rows over
    # k2 channels × 4×4 positions; fc2 keeps its 10 class rows (no consumer) over k3 columns.
    hand = (k1 * 25 + k1) + (k2 * k1 * 25 + k2) + (k3 * k2 * 16 + k3) + (10 * k3 + 10)
    man = json.loads((out / "compact.json").read_text())
    assert man["params_after"] == hand
    assert f"431,080 → {hand:,} parameters" in stdout and "graph-driven, verified" in stdout
    assert man["format"] == "prunekit-compact/2"
    cuts = {(k["tensor"], k["dim"]): k["index"] for k in man["keep"]}
    for n in ("conv1", "conv2", "fc1"):                # exactly the masks' kept rows survive
        assert cuts[(f"{n}.weight", 0)] == _kept_rows(masks[f"{n}.weight"]).tolist()
    groups = {g["name"]: g for g in man["groups"]}
    assert groups["channels:conv1"]["removed"] == 10 and not groups["neurons:fc2"]["removable"]
    assert "| neurons:fc2 | neurons | 10 | 0 | 10 | not removable: model output |" in stdout
    assert man["macs_after"] < man["macs_before"] and "MACs (from the graph)" in stdout
    model = load_compacted(out, lambda: get_model("lenet5"))
    assert sum(p.numel() for p in model.parameters()) == hand


def test_rebuilt_compacted_model_equals_masked_model(run_and_compact):
    run, out, _ = run_and_compact
    masked, _, _, _ = load_run(run)                   # weights loaded, masks applied, eval mode
    model = load_compacted(out, lambda: get_model("lenet5")).eval()
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), atol=1e-5, rtol=0)


def test_bench_prints_numeric_latency_table(run_and_compact):
    run, _, _ = run_and_compact
    rc, stdout = _cli("bench", str(run), "--repeats", "3", "--batches", "1,32", "--threads", "1")
    assert rc == 0
    rows = [l for l in stdout.splitlines() if re.match(r"\| \d+ \| \d+ \|", l)]
    assert [tuple(int(v) for v in l.split("|")[1:3]) for l in rows] == [(1, 1), (32, 1)]
    for l in rows:
        cells = [c.strip() for c in l.strip("|").split("|")]
        dense, comp, sparse, comp_x, sparse_x = (float(c) for c in cells[2:7])
        assert min(dense, comp, sparse) > 0
        for ratio, den in ((comp_x, comp), (sparse_x, sparse)):      # the ratio of the unrounded times: within
            lo, hi = (dense - 5e-4) / (den + 5e-4), (dense + 5e-4) / (den - 5e-4)   # what the printed 3 decimals allow
            assert lo - 0.005 <= ratio <= hi + 0.005, (l, lo, hi)
    assert "| dense | " in stdout and "| compacted | " in stdout
