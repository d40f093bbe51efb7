"""Clear errors and nothing left behind: a model factory that raises, a built-in model given an argument it
does not take, a missing / corrupt / mismatched ``model.checkpoint`` — one line naming the cause (exit 2, no
traceback) and no run folder; a run that fails after its start removes only the folder it created."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from prunekit.cli.main import main
from prunekit.core.errors import ModelError
from prunekit.models.user import build_model
from prunekit.pipelines.recipe import parse_recipe
from prunekit.pipelines.runner import run_pipeline

MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    def data(n=16):
        pairs = [(torch.randn(1, 28, 28), i % 2) for i in range(n)]
        return pairs, pairs

    def boom(**kw):
        raise RuntimeError("width must be even")

    class OnlyOne(nn.Module):
        '''Fine on the one-example checks, fails on a real batch.'''
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(28 * 28, 2)

        def forward(self, x):
            if x.shape[0] > 1:
                raise RuntimeError("batch too large for this toy")
            return self.fc(x.flatten(1))
""")


@pytest.fixture
def mod(tmp_path, monkeypatch):
    name = f"starterr_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _recipe(tmp_path: Path, mod: str, model: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {model}\ndata: {{factory: '{mod}:data', batch_size: 8}}\n"
                    "train: {epochs: 1}\nprune: {sparsity: 0.5}\n")
    return path


def _cli(tmp_path: Path, recipe: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRUNEKIT_NO_PROGRESS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "prunekit.cli.main", "run", str(recipe), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("prunekit run: error:"), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_cli_raising_factory_is_one_line_naming_it(mod, tmp_path):
    out = tmp_path / "out"
    r = _cli(tmp_path, _recipe(tmp_path, mod, f"{{name: '{mod}:boom'}}"), out)
    _one_line_error(r, f"model factory '{mod}:boom' raised RuntimeError: width must be even")
    assert not out.exists()


def test_cli_builtin_model_with_unknown_arg_is_one_line_naming_it(mod, tmp_path):
    out = tmp_path / "out"
    r = _cli(tmp_path, _recipe(tmp_path, mod, "{name: lenet5, args: {foo: 1}}"), out)
    _one_line_error(r, "built-in model 'lenet5' rejected model.args", "foo")
    assert not out.exists()


def test_model_errors_chain_their_cause(mod):
    with pytest.raises(ModelError, match=f"'{mod}:boom' raised RuntimeError") as e:
        build_model(f"{mod}:boom")
    assert isinstance(e.value.__cause__, RuntimeError)
    with pytest.raises(ModelError, match=r"built-in model 'lenet5' rejected model.args \['foo', 'num_classes'\]"):
        build_model("lenet5", {"foo": 1}, num_classes=10)


def test_missing_corrupt_or_mismatched_checkpoint_leaves_no_folder(mod, tmp_path, capsys):
    """``prunekit run`` (its entry point, in this process): one line on stderr, exit 2, no run folder."""
    from prunekit.models.registry import get_model
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in get_model("lenet5", num_classes=5).state_dict().items()}, str(other))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    cases = {"missing": (tmp_path / "nope.safetensors", "does not exist"),
             "corrupt": (bad, f"cannot read model.checkpoint {bad}"),
             "mismatch": (other, "(5, 500) in the checkpoint but (2, 500) in the model")}
    for name, (ckpt, needle) in cases.items():
        out = tmp_path / f"out-{name}"
        capsys.readouterr()
        assert main(["run", str(_recipe(tmp_path, mod, f"{{name: lenet5, checkpoint: '{ckpt}'}}")),
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("prunekit run: error:") and needle in err[0], (name, err)
        assert not out.exists(), name


def test_failure_after_start_removes_only_a_folder_the_run_created(mod, tmp_path):
    torch.set_num_threads(1)
    recipe = parse_recipe({"model": {"name": f"{mod}:OnlyOne"}, "data": {"factory": f"{mod}:data", "batch_size": 8},
                           "train": {"epochs": 1}, "prune": {"sparsity": 0.5}})
    out = tmp_path / "new"
    with pytest.raises(RuntimeError, match="batch too large"):
        run_pipeline(recipe, out, log=lambda *_: None)
    assert not out.exists()                                     # created by the run, held only recipe.yaml
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file")
    with pytest.raises(RuntimeError, match="batch too large"):
        run_pipeline(recipe, mine, log=lambda *_: None)
    assert (mine / "notes.txt").read_text() == "the user's own file"   # a folder that existed is never removed
