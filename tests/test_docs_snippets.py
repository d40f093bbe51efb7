"""Every Python code block of README.md and docs/*.md runs as written.

A block is executed in a fresh namespace, in a temporary working directory that holds links to the
repository's ``recipes/`` and ``examples/`` (so ``"recipes/lenet5_admm.yaml"`` resolves and files the block
writes go nowhere).  A block that uses names from its context (``model``, ``train``, a ``loader``) says so
with a visible ``# given: ...`` comment, and names its fixture with an HTML comment on the line before the
opening fence, invisible in the rendered page::

    <!-- snippet-fixture: bert_classifier -->
    ```python
    # given: model = a transformers BertForSequenceClassification, ...

The fixtures (:data:`FIXTURES`) are tiny stand-ins: a 2-layer BERT classifier, LeNet-5 on a few random
MNIST-shaped batches.  After the block ran, the results it documents are checked where its names say what
they are (:func:`_check`): a ``MaskSet`` named ``masks`` is exactly zero in the model's weights, a model
``small`` reloaded after compaction gives the outputs of ``model``, a ``mask`` is a bool tensor.
Adding a block that needs a new fixture means adding it here; an unknown fixture name fails.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import prunekit
from hf_tiny import example, tiny
from prunekit.core.masks import MaskSet
from prunekit.deploy.export import ExportResult
from prunekit.training.tasks import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```\s*(python|py|python3)\s*$")
MARKER = re.compile(r"^<!--\s*snippet-fixture:\s*([\w-]+)\s*-->\s*$")


def collect(paths: list[Path] = DOCS, root: Path = ROOT) -> list[tuple[str, str | None, str]]:
    """``(id, fixture, code)`` of every fenced Python block; the id is ``file:line``."""
    out = []
    for path in paths:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            if FENCE.match(lines[i].strip()):
                j = i + 1
                while j < len(lines) and lines[j].strip() != "```":
                    j += 1
                if j == len(lines):
                    raise AssertionError(f"{path.name}:{i + 1}: unclosed code block")
                prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
                m = MARKER.match(prev.strip())
                out.append((f"{path.relative_to(root)}:{i + 1}", m.group(1) if m else None, "\n".join(lines[i + 1:j])))
                i = j
            i += 1
    return out


SNIPPETS = collect()


# ------------------------------------------------------------------------------------------ fixtures
def _bert_batches(n: int = 2, batch: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 100, (batch, 8), generator=g),
             "attention_mask": torch.ones(batch, 8, dtype=torch.long),
             "labels": torch.randint(0, 2, (batch,), generator=g)} for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """The reader's training loop: two steps on random token batches."""
    model.train()
    for b in _bert_batches():
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
    model.eval()


def bert_classifier() -> dict[str, Any]:
    """``model``: a 2-layer BertForSequenceClassification (hidden 32, 4 heads, FFN 64); ``weight``: a 16×16
    tensor; ``train(model, opt)``: two optimizer steps; ``x``: example inputs; ``make_model()``: a fresh dense
    model of the same architecture; ``train_loader``: a DataLoader of 8 tokenised examples (dicts with labels)."""
    data = [{k: v[i] for k, v in b.items()} for b in _bert_batches() for i in range(4)]
    return {"torch": torch, "prunekit": prunekit, "model": tiny("bert"), "weight": torch.randn(16, 16),
            "train": _train, "x": example("bert"), "make_model": lambda: tiny("bert", seed=1),
            "train_loader": torch.utils.data.DataLoader(data, batch_size=4)}


def lenet5_loop() -> dict[str, Any]:
    """``model``: LeNet-5; ``optimizer``: SGD with momentum; ``retrain_optimizer``: Adam; ``loader``: two
    batches of 8 random 1×28×28 images with labels; ``epochs``: 1."""
    torch.manual_seed(0)
    model = prunekit.models.get_model("lenet5")
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    return {"torch": torch, "prunekit": prunekit, "model": model, "loader": loader, "epochs": 1,
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
            "retrain_optimizer": torch.optim.Adam(model.parameters(), lr=1e-3)}


def llama_folder() -> dict[str, Any]:
    """``llama_dir``: a tiny Llama saved with ``save_pretrained`` in the current folder (two safetensors shards);
    ``batches``: two batches of 4 random 8-token windows."""
    tiny("llama").save_pretrained("llama_dir", max_shard_size="100KB")
    g = torch.Generator().manual_seed(0)
    return {"torch": torch, "batches": [{"input_ids": torch.randint(3, 100, (4, 8), generator=g)} for _ in range(2)]}


def lenet5_export() -> dict[str, Any]:
    """``model``: LeNet-5 (eval); ``example_inputs``: 2 random images; ``batches``: two calibration batches of 8;
    ``task``: the classification task; ``dev_loader``: two labelled batches of 8."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(8, 1, 28, 28, generator=g) for _ in range(2)]
    return {"torch": torch, "prunekit": prunekit, "model": prunekit.models.get_model("lenet5").eval(),
            "example_inputs": torch.randn(2, 1, 28, 28, generator=g), "batches": images,
            "task": ClassificationTask(),
            "dev_loader": [(x, torch.randint(0, 10, (8,), generator=g)) for x in images]}


FIXTURES: dict[str, Callable[[], dict[str, Any]]] = {"bert_classifier": bert_classifier, "lenet5_loop": lenet5_loop,
                                                     "llama_folder": llama_folder, "lenet5_export": lenet5_export}


# ------------------------------------------------------------------------------------------ checks
def _outputs(model: nn.Module, x: Any) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def _check(ns: dict[str, Any]) -> int:
    """The documented results, where the block's names show them; returns how many were checked."""
    n = 0
    if isinstance(ns.get("mask"), torch.Tensor):
        assert ns["mask"].dtype == torch.bool
        n += 1
    masks, model = ns.get("masks"), ns.get("model")
    if isinstance(masks, MaskSet) and isinstance(model, nn.Module) and "small" not in ns:
        params = dict(model.named_parameters())
        assert len(masks) > 0 and masks.sparsity() > 0
        for name, m in masks.items():
            assert int((params[name].detach()[~m.to(params[name].device)] != 0).sum()) == 0, name
        n += 1
    if isinstance(ns.get("small"), nn.Module) and isinstance(model, nn.Module) and "x" in ns:
        small = ns["small"].eval()
        with torch.no_grad():
            torch.testing.assert_close(_outputs(small, ns["x"]), _outputs(model.eval(), ns["x"]), rtol=1e-4, atol=1e-5)
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in ns["make_model"]().parameters())
        n += 1
    res = ns.get("res")
    if isinstance(res, ExportResult):                  # the exported artefact: checked fp32 graph, smaller int8 file
        assert res.fp32_check.max_rel <= 1e-4 and res.bytes < res.fp32_bytes and Path(res.path).is_file()
        assert isinstance(ns.get("metrics"), dict) and 0.0 <= ns["metrics"]["accuracy"] <= 100.0
        n += 1
    if Path("out_dir/config.json").is_file() and Path("llama_dir").is_dir():   # the offloaded pruning's output
        from transformers import AutoModelForCausalLM
        pruned = AutoModelForCausalLM.from_pretrained("out_dir")
        layers = [m for name, m in pruned.named_modules() if isinstance(m, nn.Linear) and ".layers." in name]
        assert layers
        for m in layers:                                              # exactly 2 of every 4 kept
            assert ((m.weight.detach().reshape(-1, 4) != 0).sum(1) == 2).all()
        n += 1
    return n


# ------------------------------------------------------------------------------------------ tests
def test_the_docs_have_python_blocks_and_every_marker_names_a_fixture():
    ids = [s[0] for s in SNIPPETS]
    assert any(i.startswith("README.md:") for i in ids) and len(ids) >= 5
    unknown = [(i, f) for i, f, _ in SNIPPETS if f is not None and f not in FIXTURES]
    assert not unknown, f"unknown snippet fixtures {unknown}; known: {sorted(FIXTURES)}"


def test_collect_reads_markers_and_blocks(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n<!-- snippet-fixture: lenet5_loop -->\n```python\na = 1\n```\n\n```bash\nls\n```\n"
                   "```py\nb = 2\n```\n", encoding="utf-8")
    assert collect([doc], tmp_path) == [("x.md:4", "lenet5_loop", "a = 1"), ("x.md:11", None, "b = 2")]


@pytest.mark.parametrize("where,fixture,code", SNIPPETS, ids=[i for i, _, _ in SNIPPETS])
def test_snippet_runs_as_written(where, fixture, code, tmp_path, monkeypatch):
    for d in ("recipes", "examples"):
        (tmp_path / d).symlink_to(ROOT / d, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    ns: dict[str, Any] = {"__name__": "__snippet__"}
    if fixture is not None:
        ns.update(FIXTURES[fixture]())
    torch.manual_seed(0)
    exec(compile(code, where, "exec"), ns)   # noqa: S102  (the documentation's own code)
    checked = _check(ns)
    if fixture is not None:
        assert checked > 0, "a block that uses a fixture must leave a documented result to check"
