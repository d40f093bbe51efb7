"""A compacted HF model's ``save_pretrained`` folder is written only when ``from_pretrained`` gives back the
compacted model (every output compared); otherwise nothing is written and the note says why and what to use."""
from __future__ import annotations

import json

import pytest
import torch

import prunekit
from hf_tiny import example, tiny
from prunekit.deploy.hf_folder import DEPLOY_INSTEAD, config_mismatches, save_hf_folder
from prunekit.deploy.surgery import check_outputs, reference_outputs
from prunekit.graph import coupled_groups
from prunekit.graph.families import default_targets

transformers = pytest.importorskip("transformers")


def _outputs(model, x):
    with torch.no_grad():
        out = model(**x)
    return [t for t in out.to_tuple() if isinstance(t, torch.Tensor)]


def _compact(model, x, structure, sparsity=0.5, **kw):
    groups = coupled_groups(model, x)                            # one trace for pruning and compaction
    masks = prunekit.prune(model, structure, sparsity, groups=groups, targets=default_targets(model), **kw)
    refs = reference_outputs(model, x)                           # the masked model on two inputs
    res = prunekit.compact(model, masks, x, groups=groups, count_macs=False)
    assert all(c.ok for c in check_outputs(refs, model, 1e-4, 1e-5))   # compaction itself verified
    return res


def _reload_equal(model, folder, x):
    back = type(model).from_pretrained(folder).eval()
    a, b = _outputs(model, x), _outputs(back, x)
    assert len(a) == len(b) >= 1
    for u, v in zip(a, b):                                   # every output, on its own scale
        torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6 * float(u.abs().max()))
    return back


def test_qwen2_without_head_dim_in_its_config_reloads_after_kv_groups_and_neurons(tmp_path):
    """Qwen2Config has no head_dim by default: the folder written before this fix did not load (size mismatch)."""
    cfg = transformers.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    assert not hasattr(cfg, "head_dim")
    torch.manual_seed(0)
    model, x = transformers.Qwen2ForCausalLM(cfg).eval(), example("qwen2")
    res = _compact(model, x, "kv_groups+neurons")
    assert res.notes == []
    assert res.config_updates == {"head_dim": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
                                  "intermediate_size": 32}
    path, why = save_hf_folder(model, tmp_path / "hf", x)
    assert why == "" and path == tmp_path / "hf"
    saved = json.loads((path / "config.json").read_text())
    assert (saved["head_dim"], saved["num_attention_heads"], saved["num_key_value_heads"],
            saved["intermediate_size"]) == (8, 2, 1, 32)
    back = _reload_equal(model, path, x)
    assert tuple(back.model.layers[1].self_attn.k_proj.weight.shape) == (8, 32)
    assert not (tmp_path / ".hf.tmp").exists()


def test_llama_kv_groups_and_neurons_reload(tmp_path):
    model, x = tiny("llama"), example("llama")
    res = _compact(model, x, "kv_groups+neurons")
    assert res.notes == [] and res.config_updates["num_key_value_heads"] == 1
    path, why = save_hf_folder(model, tmp_path / "hf", x)
    assert why == "" and path is not None
    _reload_equal(model, path, x)


def test_gpt2_neurons_reload_through_n_inner(tmp_path):
    """GPT-2's config has n_inner=None (4 * hidden): the uniform FFN width goes there."""
    model, x = tiny("gpt2"), example("gpt2")
    res = _compact(model, x, "neurons")
    assert res.config_updates == {"n_inner": 64} and res.notes == []
    path, _ = save_hf_folder(model, tmp_path / "hf", x)
    assert path is not None
    _reload_equal(model, path, x)


def test_non_uniform_ffn_widths_are_not_written_and_the_note_says_why(tmp_path):
    model, x = tiny("llama"), example("llama")
    res = _compact(model, x, "neurons", overrides={"neurons:model.layers.1.*": 0.25})
    assert [int(m.mlp.down_proj.weight.shape[1]) for m in model.model.layers] == [32, 48]
    assert "FFN widths differ across layers (32 to 48 neurons kept)" in res.notes[0]
    assert DEPLOY_INSTEAD in res.notes[-1]
    assert "intermediate_size" not in res.config_updates
    path, why = save_hf_folder(model, tmp_path / "hf", x)
    assert path is None and not (tmp_path / "hf").exists() and not (tmp_path / ".hf.tmp").exists()
    assert "LlamaConfig cannot express the compacted sizes" in why and "mlp" in why and DEPLOY_INSTEAD in why


def test_head_pruned_bert_is_not_written_and_the_note_says_why(tmp_path):
    model, x = tiny("bert"), example("bert")
    res = _compact(model, x, "heads+neurons")
    assert res.config_updates == {"intermediate_size": 32}       # the FFN width is expressible, the heads are not
    assert "BertConfig cannot express the removed heads" in res.notes[0]
    assert "hidden_size / num_attention_heads" in res.notes[0] and "pruned_heads" in res.notes[0]
    assert DEPLOY_INSTEAD in res.notes[-1] and "ONNX" in res.notes[-1] and "compact.json" in res.notes[-1]
    bad = config_mismatches(model)
    assert bad and all("attention" in b for b in bad)
    path, why = save_hf_folder(model, tmp_path / "hf", x)
    assert path is None and not (tmp_path / "hf").exists()
    assert "query.weight: config gives (32, 32), compacted (16, 32)" in why


def test_a_folder_that_reloads_differently_is_not_written(tmp_path, monkeypatch):
    """The reload is compared, not assumed: a from_pretrained that changes a weight is caught."""
    model, x = tiny("llama"), example("llama")
    _compact(model, x, "kv_groups+neurons")
    real = type(model).from_pretrained

    def skewed(folder, *a, **k):
        m = real(folder, *a, **k)
        with torch.no_grad():
            m.model.norm.weight.mul_(1.01)
        return m

    monkeypatch.setattr(type(model), "from_pretrained", skewed)
    path, why = save_hf_folder(model, tmp_path / "hf", x)
    assert path is None and not (tmp_path / "hf").exists() and "reloaded model is not the compacted one" in why


@pytest.mark.parametrize("family,structure,written", [("llama", "kv_groups+neurons", True), ("bert", "heads+neurons", False)])
def test_prunekit_compact_announces_only_a_reloaded_hf_folder(tmp_path, monkeypatch, capsys, family, structure, written):
    """`prunekit compact RUN`: the HF folder is announced only when written (after the reload check);
    otherwise the printed notes say why and how to deploy instead."""
    import argparse
    import types

    from prunekit.cli import compact as cli_compact
    from prunekit.io.checkpoint import MODEL_FILE
    model, x = tiny(family), example(family)
    masks = prunekit.prune(model, structure, 0.5, example_inputs=x, targets=default_targets(model))
    recipe = types.SimpleNamespace(model=types.SimpleNamespace(name=f"tiny-{family}"))
    monkeypatch.setattr(cli_compact, "load_run", lambda run_dir, **kw: (model, masks, recipe, x))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / MODEL_FILE).write_bytes(b"0" * 1000)     # only its size is read (the size table)
    rc = cli_compact.run(argparse.Namespace(run_dir=str(tmp_path / "run"), out=str(tmp_path / "out"), trust_code=False))
    printed = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "out" / "hf").exists() == written
    assert ("Hugging Face model (from_pretrained)" in printed) == written
    if written:
        _reload_equal(model, tmp_path / "out" / "hf", x)
    else:
        assert "note: BertConfig cannot express the removed heads" in printed
        assert "note: no from_pretrained folder: BertConfig cannot express the compacted sizes" in printed
        assert printed.count(DEPLOY_INSTEAD) == 1
