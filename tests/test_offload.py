"""Offloaded post-training pruning (one block at a time from sharded safetensors): the same masks and weights
as the in-memory driver, HF sharded output that ``from_pretrained`` loads, activation spilling, resume."""
from __future__ import annotations

import json

import pytest
import torch

from prunekit.algorithms.obs_structured import OBSStructured
from prunekit.algorithms.offload import load_offload_masks, parse_bytes, prune_offloaded
from prunekit.algorithms.sparsegpt import SparseGPT
from prunekit.algorithms.wanda import Wanda
from prunekit.core.errors import RecipeError
from prunekit.core.plan import PruneSpec
from prunekit.core.targets import TargetSpec
from prunekit.io.sharded import INDEX_FILE, ShardReader

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_tiny import tiny  # noqa: E402

INCLUDE = [r"re:^model\.layers\.\d+\."]


def _algo(cls, structure="nm:2:4", sparsity=0.5):
    spec = PruneSpec(structure=structure, sparsity=sparsity, targets=TargetSpec(INCLUDE, [], ["Linear"]))
    return cls(cls.Params(kinds="columns") if cls is OBSStructured else cls.Params(), spec)


def _batches():
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 100, (2, 12), generator=g)} for _ in range(3)]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    m = tiny("llama")
    m.config.num_hidden_layers = 3
    m = transformers.LlamaForCausalLM(m.config).eval()
    m.save_pretrained(d, max_shard_size="100KB")           # several shards
    return d


def _in_memory(llama_dir, cls, structure):
    m = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    a = _algo(cls, structure)
    a.calibration_loader = None
    from prunekit.algorithms.calibration import run_blockwise
    from prunekit.core.masks import MaskSet
    targets, make = a.block_pruner(m, _batches())
    masks = MaskSet()
    run_blockwise(m, _batches(), targets, make(masks), hessian=a.hessian)
    return m, masks


@pytest.mark.parametrize("cls,structure", [(SparseGPT, "nm:2:4"), (Wanda, "unstructured"),
                                           (OBSStructured, "unstructured")])
def test_offloaded_equals_in_memory(llama_dir, tmp_path, cls, structure):
    assert len(ShardReader(llama_dir).weight_map) > 0 and (llama_dir / INDEX_FILE).is_file()
    ref, ref_masks = _in_memory(llama_dir, cls, structure)
    out = tmp_path / "out"
    res = prune_offloaded(llama_dir, out, _algo(cls, structure), _batches(), activation_budget=600)
    assert res.pruned_blocks == [0, 1, 2] and res.spilled_batches > 0       # 600 bytes: batches spilled to disk
    index = json.loads((out / INDEX_FILE).read_text())
    n = 3 + 3                                       # 3 blocks + embeddings, final norm, LM head (one tensor each)
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-0000{n}.safetensors" for i in range(1, n + 1)]
    got = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    masks = load_offload_masks(out)
    assert sorted(masks.names()) == sorted(ref_masks.names()) and len(masks) == 3 * 7
    for n in ref_masks.names():
        assert torch.equal(masks[n], ref_masks[n]), n
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    for n, t in ref_sd.items():
        assert torch.allclose(got_sd[n], t, atol=1e-6, rtol=0), n
    assert torch.equal(got_sd["lm_head.weight"], transformers.LlamaForCausalLM.from_pretrained(llama_dir)
                       .state_dict()["lm_head.weight"])                # LM head untouched
    if structure == "nm:2:4":
        w = got_sd["model.layers.1.mlp.down_proj.weight"]
        assert bool(((w.reshape(-1, 4) != 0).sum(1) == 2).all())
    x = _batches()[0]["input_ids"]
    assert torch.allclose(got(x).logits, ref(x).logits, atol=1e-5)


def test_offloaded_resume_after_kill(llama_dir, tmp_path):
    full = tmp_path / "full"
    prune_offloaded(llama_dir, full, _algo(SparseGPT), _batches())
    out = tmp_path / "killed"

    def die(i):
        if i == 1:
            raise KeyboardInterrupt("killed after block 1")
    with pytest.raises(KeyboardInterrupt):
        prune_offloaded(llama_dir, out, _algo(SparseGPT), _batches(), on_block_done=die)
    assert not (out / INDEX_FILE).exists()
    from prunekit.core.errors import CheckpointError
    with pytest.raises(CheckpointError, match="unfinished offloaded run of another"):
        prune_offloaded(llama_dir, out, _algo(SparseGPT, sparsity=0.25, structure="unstructured"), _batches())
    res = prune_offloaded(llama_dir, out, _algo(SparseGPT), _batches())
    assert res.pruned_blocks == [2]                                     # blocks 0 and 1 not recomputed
    a = transformers.AutoModelForCausalLM.from_pretrained(full).state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not (out / ".offload").exists()


def test_offload_refuses_targets_outside_the_blocks(llama_dir, tmp_path):
    spec = PruneSpec("unstructured", 0.5, targets=TargetSpec(["lm_head", "model.layers.*"], [], ["Linear"]))
    with pytest.raises(RecipeError, match="lm_head"):
        prune_offloaded(llama_dir, tmp_path / "o", Wanda(Wanda.Params(), spec), _batches())


def test_offload_errors(tmp_path):
    assert parse_bytes("1GB") == 10**9 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes(7) == 7
    with pytest.raises(RecipeError, match="memory size"):
        parse_bytes("lots")
    from prunekit.core.errors import CheckpointError
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        ShardReader(tmp_path)


def test_cli_offloaded_run_matches_in_memory_run(tmp_path):
    """``calibration.offload: true`` through ``prunekit run``: same pruned perplexity and masks as the
    in-memory pipeline on the same recipe; exactly 2:4; LM head dense; report reads it."""
    import yaml

    from prunekit.adapters.hf import load_tokenizer
    from prunekit.cli.main import main
    tok = load_tokenizer("minilm-l6")
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    folder = tmp_path / "lm"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="1MB")
    tok.save_pretrained(folder)
    text = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning light",
            "the rain falls on the quiet town"] * 6
    (tmp_path / "train.txt").write_text("\n".join(text))
    (tmp_path / "eval.txt").write_text("\n".join(text[::-1][:8]))
    recipe = {"name": "off", "model": {"name": str(folder)},
              "data": {"name": "text", "train": str(tmp_path / "train.txt"), "eval": str(tmp_path / "eval.txt"),
                       "max_length": 16, "batch_size": 4, "eval_batch_size": 4},
              "prune": {"structure": "nm:2:4", "sparsity": 0.5}, "algorithm": {"name": "sparsegpt"},
              "calibration": {"samples": 6, "batch_size": 3, "max_length": 16}, "train": {"epochs": 0}}
    runs = {}
    for mode in ("memory", "offload"):
        r = dict(recipe, calibration={**recipe["calibration"], **({"max_memory": "3KB"} if mode == "offload" else {})})
        (tmp_path / f"{mode}.yaml").write_text(yaml.safe_dump(r))
        assert main(["run", str(tmp_path / f"{mode}.yaml"), "--out", str(tmp_path / mode)]) == 0
        runs[mode] = json.loads((tmp_path / mode / "results.json").read_text())
    mem, off = runs["memory"], runs["offload"]
    assert off["dense_score"] == pytest.approx(mem["dense_score"], rel=1e-5)
    assert off["score"] == pytest.approx(mem["score"], rel=1e-5)
    assert off["sparsity"] == pytest.approx(0.5) and off["offload"]["spilled_batches"] > 0
    assert {r["name"]: r["nonzeros"] for r in off["layers"]} == {r["name"]: r["nonzeros"] for r in mem["layers"]}
    sd = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "offload" / "model").state_dict()
    assert bool(((sd["model.layers.0.self_attn.q_proj.weight"].reshape(-1, 4) != 0).sum(1) == 2).all())
    assert bool((sd["lm_head.weight"] != 0).all())
    assert main(["report", str(tmp_path / "offload")]) == 0
