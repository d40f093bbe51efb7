"""Causal language models from a recipe: token windows, perplexity per token, a CLI run with SparseGPT 2:4."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_tiny import tiny
from prunekit.cli.main import main
from prunekit.core.errors import DataError, RecipeError
from prunekit.data.lm_text import read_texts, token_windows
from prunekit.pipelines.recipe import parse_recipe
from prunekit.pipelines.workloads import build_workload
from prunekit.training.tasks import CausalLMTask, better

pytest.importorskip("transformers")
os.environ.setdefault("PRUNEKIT_NO_PROGRESS", "1")

TEXT = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning light",
        "the rain falls on the quiet town", "children play near the old river", "music fills the warm evening air"]


class CharTok:
    """A hand-checkable tokenizer: one id per character (a=1 … z=26, space=27), eos=0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[27 if c == " " else ord(c) - 96 for c in t] for t in texts]}


def test_token_windows_exact():
    w = token_windows(["ab", "c", "de f"], CharTok(), 3)
    # stream: a b EOS c EOS d e SP f EOS  -> 10 ids -> 3 windows of 3, the last id dropped
    assert w.tolist() == [[1, 2, 0], [3, 0, 4], [5, 27, 6]]
    with pytest.raises(DataError, match="no window of 20 tokens"):
        token_windows(["ab"], CharTok(), 20)


def test_read_texts_formats(tmp_path):
    (tmp_path / "a.txt").write_text("one two\n\nthree\n")
    (tmp_path / "a.jsonl").write_text('{"text": "x y"}\n{"text": "z"}\n')
    (tmp_path / "a.tsv").write_text("sentence\tlabel\nhello there \t1\nbye\t0\n")
    assert read_texts(tmp_path / "a.txt") == ["one two", "three"]
    assert read_texts(tmp_path / "a.jsonl") == ["x y", "z"]
    assert read_texts(tmp_path / "a.tsv", column="sentence") == ["hello there ", "bye"]
    with pytest.raises(DataError, match="no field 'body'"):
        read_texts(tmp_path / "a.jsonl", column="body")


class Bigram(torch.nn.Module):
    """logits at position t depend on token t only: a table."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return self.table[input_ids]


def test_perplexity_is_exp_mean_nll_by_hand():
    # vocab 2; from token 0: p(0)=0.5, p(1)=0.5; from token 1: p(0)=0.2, p(1)=0.8
    table = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8]]))
    ids = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    # predictions: (0→1) .5, (1→1) .8, (1→0) .2 ; (1→1) .8 x3
    nll = -(math.log(.5) + math.log(.8) + math.log(.2) + 3 * math.log(.8))
    loader = torch.utils.data.DataLoader([{"input_ids": r} for r in ids], batch_size=1)
    m = CausalLMTask().evaluate(Bigram(table), loader)
    assert m["tokens"] == 6
    assert m["perplexity"] == pytest.approx(math.exp(nll / 6), rel=1e-6)
    assert better(CausalLMTask(), 3.0, 4.0) and not better(CausalLMTask(), 4.0, 3.0)


def _recipe(tmp_path: Path, **over) -> dict:
    (tmp_path / "train.txt").write_text("\n".join(TEXT * 4))
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXT[::-1]))
    r = {"name": "tiny-lm", "model": {"name": "llama-config", "args": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64}},
         "data": {"name": "text", "train": str(tmp_path / "train.txt"), "eval": str(tmp_path / "eval.jsonl"),
                  "max_length": 16, "batch_size": 4, "eval_batch_size": 8},
         "prune": {"structure": "nm:2:4", "sparsity": 0.5},
         "algorithm": {"name": "sparsegpt"},
         "calibration": {"samples": 8, "batch_size": 4, "max_length": 16},
         "train": {"epochs": 0}}
    r.update(over)
    return r


def test_lm_workload_windows_and_targets(tmp_path):
    wl = build_workload(parse_recipe(_recipe(tmp_path)))
    assert wl.info["task_type"] == "causal_lm" and wl.task.metric == "perplexity"
    ds = wl.train_loader.dataset
    assert all(ds[i]["input_ids"].shape == (16,) for i in range(len(ds)))
    names = {n for n, _ in wl.model.named_modules()}
    assert "lm_head" in names and not any("lm_head" in p or "embed" in p for p in wl.info["targets"])


def test_lm_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="needs both files"):
        parse_recipe(_recipe(tmp_path, data={"name": "text", "train": "x.txt"}))
    with pytest.raises(RecipeError, match="decoder"):
        build_workload(parse_recipe(_recipe(tmp_path, model={"name": "bert-base-config"})))


def test_cli_sparsegpt_24_lm_end_to_end(tmp_path):
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(_recipe(tmp_path)))
    out = tmp_path / "run"
    assert main(["run", str(rp), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["metric"] == "perplexity"
    dense, pruned = res["metrics"]["dense"]["perplexity"], res["metrics"]["after_hard_prune"]["perplexity"]
    assert math.isfinite(dense) and math.isfinite(pruned) and dense > 1 and pruned > 1
    state = load_file(str(out / "model.safetensors"))
    n = 0
    for name, w in state.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            g = (w.reshape(-1, 4) != 0).sum(1)
            assert bool((g == 2).all()), name       # exactly 2 of every 4 kept (random init: no exact zeros)
            n += 1
        elif name.startswith(("lm_head", "model.embed")):
            assert bool((w != 0).all()), name       # dense
    assert n == 2 * 7
    assert main(["report", str(out), "--plots", "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "perplexity" in md and f"{pruned:.2f}" in md
    assert main(["compact", str(out), "--out", str(tmp_path / "cmp")]) == 0
    sparse = load_file(str(tmp_path / "cmp" / "model.safetensors"))
    assert torch.equal(sparse["model.layers.0.mlp.down_proj.weight"], state["model.layers.0.mlp.down_proj.weight"])


def test_a_tokenizer_larger_than_the_embedding_is_refused_naming_both_sizes():
    """A folder whose tokenizer gained a token (e.g. an added eos) would index past the embedding deep in the forward;
    prunekit refuses it before any work, in memory and offloaded alike (both call check_vocab)."""
    from prunekit.pipelines.user_workloads import check_vocab
    model = tiny("llama")
    rows = int(model.get_input_embeddings().weight.shape[0])

    class Tok:
        def __len__(self):
            return rows + 1

    with pytest.raises(RecipeError, match=f"has {rows} token embeddings but its tokenizer {rows + 1} tokens"):
        check_vocab(model, Tok(), "my-folder")
    Tok.__len__ = lambda self: rows                       # type: ignore[method-assign]
    check_vocab(model, Tok(), "my-folder")                # equal sizes pass


def test_hf_disk_texts_for_language_modelling(tmp_path):
    """A ``save_to_disk`` DatasetDict is read split by split (empty texts dropped); a missing split or column is a
    DataError listing what is there."""
    datasets = pytest.importorskip("datasets", reason="datasets is in the nlp extra the README installs")
    from prunekit.data.lm_text import read_hf_disk_texts
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a cat sat", "", "on the mat"]}),
                               "validation": datasets.Dataset.from_dict({"text": ["the end"]})})
    dd.save_to_disk(str(tmp_path / "ds"))
    assert read_hf_disk_texts(tmp_path / "ds", "train", None) == ["a cat sat", "on the mat"]
    assert read_hf_disk_texts(tmp_path / "ds", "validation", "text") == ["the end"]
    with pytest.raises(DataError, match=r"no split 'test'; splits: \['train', 'validation'\]"):
        read_hf_disk_texts(tmp_path / "ds", "test", None)
    with pytest.raises(DataError, match=r"no column 'body'; columns: \['text'\]"):
        read_hf_disk_texts(tmp_path / "ds", "train", "body")
