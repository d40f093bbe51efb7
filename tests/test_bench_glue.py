"""benchmarks/glue_minilm.py helpers: row parsing (bad --rows entries name the problem) and merging."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "glue_minilm", Path(__file__).resolve().parents[1] / "benchmarks" / "glue_minilm.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_parse_row_keeps_colons_of_the_structure():
    assert bench.parse_row("mrpc:block:4x4:0.3") == ("mrpc", "block:4x4", 0.3)
    assert bench.parse_row("sst2:distill@row:0.3") == ("sst2", "distill@row", 0.3)
    assert [bench.pruned_structure(s) for s in ("distill", "distill@block:4x4", "row")] == \
        ["unstructured", "block:4x4", "row"]


@pytest.mark.parametrize("bad", ["sst2", "sst2:0.3", ":row:0.3", "sst2:row:half"])
def test_bad_rows_entry_names_the_entry(bad, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--rows", bad, "--out", "/nonexistent/never-written.json"])
    assert e.value.code == 2
    assert f"--rows entry {bad!r}: expected task:structure:sparsity" in capsys.readouterr().err


def test_merge_replaces_same_row_and_keeps_others(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "constant_baseline", lambda task: 50.0)   # no data files needed here
    row = {"task": "sst2", "method": "oneshot+retrain", "structure": "row", "sparsity": 0.2997, "score": 80.0}
    (tmp_path / "a.json").write_text(json.dumps({"dense": {"sst2": {"score": 86.0}}, "rows": [row],
                                                 "missing": ["sst2 column 0.3"]}))
    (tmp_path / "b.json").write_text(json.dumps({"dense": {}, "rows": [
        {**row, "score": 81.0}, {**row, "structure": "column", "score": 79.0}], "missing": []}))
    out = tmp_path / "m.json"
    assert bench.merge(out, [tmp_path / "a.json", tmp_path / "b.json"]) == 0
    m = json.loads(out.read_text())
    assert [(r["structure"], r["score"]) for r in m["rows"]] == [("row", 81.0), ("column", 79.0)]
    assert m["missing"] == [] and m["dense"] == {"sst2": {"score": 86.0}} and m["constant_baseline"] == {"sst2": 50.0}


def test_constant_baseline_is_in_points():
    """The metrics are reported in points (0-100): MRPC's all-"equivalent" F1 on the 408 dev pairs is 81.22
    (279 positives: 2*279 / (2*279 + 129)), not 8121.7."""
    from prunekit.data.glue import load_glue  # noqa: PLC0415
    try:
        load_glue("mrpc", split="dev")
    except Exception:  # noqa: BLE001
        pytest.skip("GLUE MRPC not in the data folder")
    assert bench.constant_baseline("mrpc") == pytest.approx(100 * 2 * 279 / (2 * 279 + 129), abs=0.01)
