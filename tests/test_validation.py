"""Validated inputs: random recipes / structure strings / prune specs are accepted or rejected with a clear
RecipeError/ValueError (never another exception from deep inside); bad files fail before work; the CLI
prints one line and exits 2; nothing in the source ever unpickles."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunekit.core.errors import RecipeError
from prunekit.core.plan import PruneSpec
from prunekit.core.structures import parse_structure
from prunekit.io.checkpoint import CheckpointError, save_checkpoint
from prunekit.pipelines.recipe import Recipe, parse_recipe

SRC = Path(__file__).resolve().parents[1] / "src" / "prunekit"

# keys a recipe really has (so the fuzzer reaches deep validation) mixed with junk
KEYS = ["name", "seed", "task", "model", "data", "prune", "algorithm", "train", "dense", "search", "retrain",
        "distill", "extra", "checkpoint_every", "args", "checkpoint", "root", "limit", "eval_limit", "batch_size",
        "eval_batch_size", "max_length", "augment", "structure", "sparsity", "score", "scope", "targets",
        "overrides", "include", "exclude", "types", "params", "epochs", "lr", "optimizer", "momentum",
        "weight_decay", "scheduler", "warmup_ratio", "grad_clip", "patience", "eval_every", "rho", "update_every",
        "initial_sparsity", "begin", "end", "frequency", "conv1", "*"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["sgd", "adam", "cosine", "block:4x4", "nm:2:4", "admm",
                                                            "gradual", "lenet5", "mnist", "layer", "global", "l2"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner,
                                                 max_size=4)), max_leaves=12)
recipes = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)
ALLOWED = (RecipeError, ValueError)


def _accepts_or_clear_error(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except ALLOWED as e:
        assert str(e).strip(), f"empty error message from {fn.__name__}"
        return None
    # any other exception type propagates and fails the test with hypothesis' minimal example


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes)
def test_fuzz_parse_recipe(raw):
    r = _accepts_or_clear_error(parse_recipe, raw)
    if r is not None:      # accepted → every value is in range and the prune spec can be built
        assert isinstance(r, Recipe) and 0 <= r.prune.sparsity < 1 and r.data.batch_size >= 1
        for phase in ("dense", "search", "retrain"):
            cfg = r.phase(phase)
            assert cfg.lr > 0 and math.isfinite(cfg.lr) and math.isfinite(cfg.epochs)
        from prunekit.pipelines.runner import prune_spec_from
        _accepts_or_clear_error(prune_spec_from, r)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=20),
                 st.lists(st.sampled_from(["block", "nm", "pattern", "row", "column", "unstructured", ":", "x", "-",
                                           "0", "1", "2", "4", "16", "99999999999999999999", " ", "conn", "+"]),
                          max_size=7).map("".join),
                 scalars))
def test_fuzz_parse_structure(s):
    _accepts_or_clear_error(parse_structure, s)


@settings(max_examples=200, deadline=None)
@given(structure=st.one_of(st.text(max_size=10), st.sampled_from(["block:2x2", "nm:2:4", "nm:5:4", "block:0x3"])),
       sparsity=st.floats(allow_nan=True), scope=st.text(max_size=8),
       overrides=st.dictionaries(st.text(max_size=5), st.one_of(st.floats(allow_nan=True), st.fixed_dictionaries(
           {}, optional={"sparsity": st.floats(allow_nan=True), "structure": st.text(max_size=8)})), max_size=3))
def test_fuzz_prune_spec(structure, sparsity, scope, overrides):
    _accepts_or_clear_error(PruneSpec, structure, sparsity, "l2", scope, overrides=overrides)


@pytest.mark.parametrize("raw,needle", [
    ({"prune": {"sparsity": 1.0}}, "prune.sparsity"),
    ({"prune": {"sparsity": -0.1}}, "prune.sparsity"),
    ({"prune": {"structure": "block:0x4"}}, "block shape must be positive"),
    ({"prune": {"structure": "nm:5:4"}}, "N <= M"),
    ({"train": {"lr": 0}}, "lr"),
    ({"train": {"lr": float("inf")}}, "not a finite number"),
    ({"retrain": {"lr": -1}}, "retrain.lr"),
    ({"train": {"epochs": float("nan")}}, "epochs"),
    ({"data": {"batch_size": 0}}, "batch_size"),
    ({"seed": -1}, "seed"),
    ({"checkpoint_every": -5}, "checkpoint_every"),
    ({"prune": {"overrides": {"fc*": {"sparsity": 2}}}}, "overrides['fc*'].sparsity"),
    ({"prune": {"overrides": {"fc*": {"kept": 2}}}}, "unknown keys"),
    ({"model": {"name": "lenet7"}}, "lenet5"),
    ({"data": {"name": "imagenet"}}, "mnist"),
    ({"algorithm": {"name": "magic"}}, "admm"),
    ({"trian": {}}, "valid keys"),
])
def test_bad_values_name_the_key(raw, needle):
    with pytest.raises(RecipeError, match=re.escape(needle)):
        parse_recipe(raw)


def _cli(*args):
    env = {**os.environ, "PRUNEKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "prunekit.cli.main", *args], capture_output=True, text=True, env=env)


def test_cli_bad_recipe_one_line_exit_2(tmp_path):
    """The real process: `prunekit run bad.yaml` → one line on stderr, exit status 2, no traceback."""
    (tmp_path / "bad.yaml").write_text("name: x\nprune: {sparsity: 1.5}\n")
    r = _cli("run", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "prunekit run: error: prune.sparsity: 1.5 is out of range (must be < 1)"
    assert not (tmp_path / "out").exists()


def test_cli_bad_inputs_fail_before_work(tmp_path, capsys):
    """Target pattern matching nothing, missing data files, a checkpoint of another model: one line,
    exit 2, and nothing trained (no dense checkpoint, no run state)."""
    from prunekit.cli.main import main
    from prunekit.models.registry import get_model
    (tmp_path / "empty").mkdir()
    save_checkpoint(tmp_path / "other", get_model("lenet5_classic", num_classes=5))
    cases = {
        "targets": ("model: {name: lenet5_classic}\ndata: {limit: 64}\nprune: {targets: {include: [nosuch*]}}\n",
                    "target pattern 'nosuch*' matches no"),
        "nodata": (f"model: {{name: lenet5_classic}}\ndata: {{root: {tmp_path / 'empty'}, limit: 64}}\n", "mnist"),
        "ckpt": (f"model: {{name: lenet5_classic, checkpoint: {tmp_path / 'other'}}}\ndata: {{limit: 64}}\n",
                 "tensor 'fc3.weight' has shape (5, 84) in the checkpoint but (10, 84) in the model"),
    }
    for name, (text, needle) in cases.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        out = tmp_path / f"out-{name}"
        capsys.readouterr()
        assert main(["run", str(tmp_path / f"{name}.yaml"), "--out", str(out)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("prunekit run: error:") and needle in err[0], (name, err)
        assert not (out / "dense").exists() and not (out / "state").exists()


def test_checkpoint_of_another_model_names_tensor_and_shapes(tmp_path):
    from prunekit.io.checkpoint import load_checkpoint
    from prunekit.models.registry import get_model
    save_checkpoint(tmp_path, get_model("lenet5_classic", num_classes=5))
    with pytest.raises(CheckpointError, match=r"tensor 'fc3.weight' has shape \(5, 84\) in the checkpoint "
                                              r"but \(10, 84\) in the model"):
        load_checkpoint(tmp_path, get_model("lenet5_classic", num_classes=10))


def test_no_unpickling_anywhere_in_the_source():
    """Safety: no pickle, no torch.load without weights_only=True, no numpy allow_pickle, no all_gather_object."""
    bad = []
    pats = [re.compile(r"\bimport\s+pickle\b|\bfrom\s+pickle\b|\bpickle\.|\bcPickle\b|\bdill\b|\bjoblib\b"),
            re.compile(r"allow_pickle\s*=\s*True"), re.compile(r"\b(all_gather|broadcast)_object(_list)?\("),
            re.compile(r"\bshelve\b|\bmarshal\.loads?\(")]
    for f in sorted(SRC.rglob("*.py")):
        text = f.read_text(encoding="utf-8")
        for i, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(p.search(code) for p in pats):
                bad.append(f"{f.relative_to(SRC)}:{i}: {line.strip()}")
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start(): text.find(")", m.start()) + 1]
            if "weights_only=True" not in call:
                bad.append(f"{f.relative_to(SRC)}: {call}")
    assert not bad, "unpickling code found:\n" + "\n".join(bad)
    assert len(list(SRC.rglob("*.py"))) > 20          # the grep really saw the package


def test_exponent_floats_without_a_dot_are_numbers():
    """YAML 1.1 reads ``1e-4`` as a string; a recipe / --set value like that means the number."""
    from prunekit.pipelines.recipe import apply_overrides
    raw = {"model": {"name": "lenet5"}, "data": {"name": "mnist"}, "train": {"lr": "5E-3"}}
    r = parse_recipe(apply_overrides(raw, ["retrain.lr=1e-4", "prune.sparsity=3e-1"]))
    assert r.train.lr == 5e-3 and r.phase("retrain").lr == 1e-4 and r.prune.sparsity == 0.3
    with pytest.raises(RecipeError, match=r"retrain\.lr: expected a number, got '1e-4x'"):
        parse_recipe(apply_overrides(raw, ["retrain.lr=1e-4x"]))
