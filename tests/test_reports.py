"""Reports over run folders: paper-style tables with hand-set numbers, PNGs of the right pixel size,
`prunekit report` with one and with several folders."""
from __future__ import annotations

import json

import pytest
import yaml
from matplotlib.image import imread

from prunekit.cli.main import main
from prunekit.reporting.plots import DEFAULT_SIZE
from prunekit.reporting.runs import build_report, levels_table, load_run, load_runs, methods_tasks_table


def _layers(sp1, sp2):
    return [{"name": "enc.q.weight", "shape": [4, 4], "structure": "unstructured", "sparsity": sp1, "nonzeros": 16 - int(16 * sp1),
             "numel": 16},
            {"name": "enc.ffn.weight", "shape": [8, 4], "structure": "unstructured", "sparsity": sp2,
             "nonzeros": 32 - int(32 * sp2), "numel": 32}]


def make_run(root, name, *, task="sst2", kind="glue", metric="accuracy", method="admm", structure="unstructured",
             target=0.5, sparsity=0.5, score=90.0, dense=92.0, cr=2.0, latency=None, levels=None, layers=None):
    d = root / name
    d.mkdir(parents=True)
    res = {"name": name, "metric": metric, "score": score, "dense_score": dense, "score_after_hard_prune": score - 10,
           "sparsity": sparsity, "target_sparsity": target, "compression_rate": cr, "params": 1000,
           "nonzero_params": int(1000 / cr), "algorithm": method, "structure": structure,
           "layers": layers if layers is not None else _layers(sparsity, sparsity)}
    if latency is not None:
        res["latency_ms"] = latency
    if levels is not None:
        res["levels"] = levels
    (d / "results.json").write_text(json.dumps(res))
    recipe = {"name": name, "task": kind, "data": {"name": task}, "algorithm": {"name": method},
              "prune": {"structure": structure, "sparsity": target}}
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return d


@pytest.fixture
def glue_runs(tmp_path):
    return [make_run(tmp_path, "admm-sst2", task="sst2", score=91.06, dense=92.00, cr=1.9),
            make_run(tmp_path, "admm-mrpc", task="mrpc", metric="f1", score=85.12, dense=88.00, cr=1.9),
            make_run(tmp_path, "oneshot-sst2", task="sst2", method="oneshot", score=88.01, dense=92.00, cr=1.9,
                     latency=3.25),
            make_run(tmp_path, "nm-sst2", task="sst2", method="oneshot", structure="nm:2:4", target=0.5,
                     sparsity=0.5, score=89.50, dense=92.00, cr=1.95, latency=2.5)]


def test_methods_tasks_table_cells(glue_runs):
    md = methods_tasks_table(load_runs(glue_runs))
    lines = md.splitlines()
    assert lines[0] == "| method | structure | sparsity | compression rate | SST-2 (acc) | MRPC (F1) | avg |"
    assert lines[2] == "| dense | – | 0.00% | 1.00× | 92.00 | 88.00 | 90.00 |"
    # admm row has both tasks: avg = (91.06 + 85.12) / 2 = 88.09
    assert lines[3] == "| admm | unstructured | 50.00% | 1.90× | 91.06 | 85.12 | 88.09 |"
    # oneshot has no MRPC run: dash in the cell and in the average
    assert lines[4] == "| oneshot | unstructured | 50.00% | 1.90× | 88.01 | – | – |"
    assert lines[5] == "| oneshot | nm:2:4 | 50.00% | 1.95× | 89.50 | – | – |"
    assert len(lines) == 6


def test_classification_scores_are_not_rescaled(tmp_path):
    r = make_run(tmp_path, "lenet", task="mnist", kind="classification", score=98.76, dense=99.1, cr=10.0,
                 target=0.9, sparsity=0.9)
    md = methods_tasks_table([load_run(r)])
    assert md.splitlines()[0].endswith("| MNIST (acc) |")   # one task: no avg column
    assert md.splitlines()[3] == "| admm | unstructured | 90.00% | 10.00× | 98.76 |"


def test_levels_table(tmp_path):
    levels = [{"sparsity": 0.5, "score": 91.0, "latency_ms": 4.0, "compression_rate": 2.0},
              {"sparsity": 0.75, "score": 88.0, "latency_ms": 3.0},
              {"sparsity": 0.9, "accuracy": 80.0}]
    r = load_run(make_run(tmp_path, "shared", levels=levels))
    lines = levels_table(r).splitlines()
    assert lines[0] == "| level | sparsity | accuracy | compression rate | latency (ms) |"
    assert lines[2] == "| 0 | 50.00% | 91.00 | 2.00× | 4.000 |"
    assert lines[3] == "| 1 | 75.00% | 88.00 | – | 3.000 |"
    assert lines[4] == "| 2 | 90.00% | 80.00 | – | – |"
    with pytest.raises(ValueError, match="no 'levels'"):
        levels_table(load_run(make_run(tmp_path, "plain")))


def test_build_report_writes_markdown_and_pngs_of_exact_size(glue_runs, tmp_path):
    shared = make_run(tmp_path, "shared", levels=[{"sparsity": 0.5, "score": 90.0, "latency_ms": 4.0},
                                                  {"sparsity": 0.8, "score": 85.0, "latency_ms": 2.0}],
                      layers=_layers(0.2, 0.8))
    rep = build_report(glue_runs + [shared], tmp_path / "rep")
    names = sorted(p.rsplit("/", 1)[1] for p in rep["files"])
    assert names == ["accuracy_vs_sparsity.png", "latency_vs_sparsity.png", "layer_sparsity.png", "report.md"]
    for f in rep["files"]:
        if f.endswith(".png"):
            img = imread(f)
            assert img.shape[:2] == (DEFAULT_SIZE[1], DEFAULT_SIZE[0])     # rows = height
            assert img[..., :3].std() > 0.01                              # not a blank canvas
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| dense | – | 0.00% | 1.00× | 92.00 | 88.00 | 90.00 |" in md
    assert "## Shared-weight levels: shared" in md and "| 1 | 80.00% | 85.00 | – | 2.000 |" in md
    assert "![per-layer sparsity](layer_sparsity.png)" in md


def test_no_latency_no_latency_plot(tmp_path):
    runs = [make_run(tmp_path, f"r{i}", sparsity=s, target=s) for i, s in enumerate((0.5, 0.8))]
    rep = build_report(runs)          # default out: first run's parent /report
    assert rep["out"] == str((tmp_path / "report").resolve())
    assert not (tmp_path / "report" / "latency_vs_sparsity.png").exists()
    assert (tmp_path / "report" / "accuracy_vs_sparsity.png").stat().st_size > 1000


def test_cli_report_single_and_many(glue_runs, tmp_path, capsys):
    assert main(["report", str(glue_runs[0])]) == 0
    out = capsys.readouterr().out
    assert "| enc.q.weight | 4×4 | unstructured | 50.00% | 8 |" in out
    assert not (tmp_path / "report").exists()                      # one dir: table only, nothing written
    assert main(["report", *map(str, glue_runs), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "| admm | unstructured | 50.00% | 1.90× | 91.06 | 85.12 | 88.09 |" in out
    assert (tmp_path / "o" / "report.md").is_file() and (tmp_path / "o" / "layer_sparsity.png").is_file()


def test_missing_recipe_is_a_clear_error(tmp_path, capsys):
    d = make_run(tmp_path, "r")
    (d / "recipe.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="recipe.yaml does not exist"):
        load_run(d)
    assert main(["report", str(d), str(d)]) == 2
    assert "recipe.yaml does not exist" in capsys.readouterr().err


def test_shared_weight_run_as_run_shared_writes_it(tmp_path, capsys):
    """results.json of prunekit.pipelines.shared.run_shared: no top-level score/layers, a `levels` list."""
    d = tmp_path / "sw"
    d.mkdir()
    levels = [{"level": k, "target_sparsity": t, "sparsity": t, "metric": "accuracy", "score": s, "latency_ms": l,
               "dense_score": 99.0} for k, (t, s, l) in enumerate([(0.9, 97.5, 1.5), (0.75, 98.25, 1.75),
                                                                   (0.5, 98.75, 2.0)])]
    (d / "results.json").write_text(json.dumps({"name": "sw", "metric": "accuracy", "dense_score": 99.0,
                                                "levels": levels, "algorithm": "oneshot",
                                                "structure": "unstructured"}))
    (d / "recipe.yaml").write_text(yaml.safe_dump({"name": "sw", "task": "classification", "data": {"name": "mnist"},
                                                   "prune": {"structure": "unstructured", "sparsity": 0.5}}))
    r = load_run(d)
    assert (r.score, r.sparsity, r.target_sparsity) == (97.5, 0.9, 0.9)       # headline = sparsest level
    assert main(["report", str(d)]) == 0
    out = capsys.readouterr().out
    assert "| 1 | 75.00% | 98.25 | – | 1.750 |" in out
    other = make_run(tmp_path, "plain", task="mnist", kind="classification", score=98.0, dense=99.0, target=0.9,
                     sparsity=0.9, cr=8.0, latency=2.5)
    rep = build_report([d, other], tmp_path / "rep")
    names = sorted(p.rsplit("/", 1)[1] for p in rep["files"])
    assert names == ["accuracy_vs_sparsity.png", "latency_vs_sparsity.png", "layer_sparsity.png", "report.md"]
    assert "| 2 | 50.00% | 98.75 | – | 2.000 |" in rep["markdown"]


def test_runs_of_one_recipe_are_labelled_by_their_folder(tmp_path):
    """Several runs of the same recipe (same `name`) stay apart in a report: rows are folder names."""
    from prunekit.reporting.runs import summary_table
    a = make_run(tmp_path, "seed0", score=90.0)
    b = make_run(tmp_path, "seed1", score=91.0)
    for d in (a, b):                                   # both runs come from the recipe named "sst2-admm"
        res = json.loads((d / "results.json").read_text())
        (d / "results.json").write_text(json.dumps({**res, "name": "sst2-admm"}))
    runs = load_runs([a, b])
    assert [r.name for r in runs] == ["seed0", "seed1"]
    assert [r.recipe_name for r in runs] == ["sst2-admm", "sst2-admm"]
    table = summary_table(runs)
    assert "| seed0 |" in table and "| seed1 |" in table
