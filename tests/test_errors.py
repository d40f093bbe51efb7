"""One registry mechanism and one exception hierarchy: a miss names the valid entries the same way for
every kind; the CLI turns only prunekit's own errors into one line, a real bug keeps its traceback."""
from __future__ import annotations

import argparse

import pytest

from prunekit.algorithms import ALGORITHMS, get_algorithm_class
from prunekit.cli import main as cli_main
from prunekit.core.errors import CheckpointError, DataError, ModelError, PrunekitError, RecipeError, UnknownNameError
from prunekit.core.registry import Registry
from prunekit.data.registry import DATASETS, get_dataset
from prunekit.models.registry import MODELS, get_model
from prunekit.pipelines.workloads import TASKS


@pytest.mark.parametrize("registry,lookup,kind", [
    (ALGORITHMS, get_algorithm_class, "algorithm"),
    (MODELS, get_model, "model"),
    (DATASETS, get_dataset, "dataset"),
    (TASKS, TASKS.get, "task"),
])
def test_every_registry_misses_the_same_way(registry, lookup, kind):
    with pytest.raises(UnknownNameError) as e:
        lookup("no-such-thing")
    msg = str(e.value)
    assert msg.startswith(f"unknown {kind} 'no-such-thing'; valid: ")
    assert all(name in msg for name in registry.names())
    assert isinstance(e.value, RecipeError) and isinstance(e.value, ValueError)


def test_registry_basics():
    r: Registry[int] = Registry("thing")
    r.add("b", 2)
    r.register("a", aliases=("alpha",))(1)
    assert r.names() == ["a", "b"] and r.get("alpha") == 1 and "alpha" in r and len(r) == 2
    with pytest.raises(ValueError, match="already registered"):
        r.add("a", 3)


def test_hierarchy_keeps_builtin_bases():
    for cls, base in [(RecipeError, ValueError), (DataError, ValueError), (ModelError, ValueError),
                      (CheckpointError, RuntimeError)]:
        assert issubclass(cls, PrunekitError) and issubclass(cls, base)


def _fake_command(exc: BaseException):
    def add_parser(sub):
        p = sub.add_parser("boom")
        p.set_defaults(func=lambda args: (_ for _ in ()).throw(exc))
    return add_parser


def _run_fake(monkeypatch, exc):
    parser = argparse.ArgumentParser(prog="prunekit")
    sub = parser.add_subparsers(dest="command")
    _fake_command(exc)(sub)
    monkeypatch.setattr(cli_main, "build_parser", lambda: parser)
    return cli_main.main(["boom"])


def test_cli_user_error_is_one_line(monkeypatch, capsys):
    assert _run_fake(monkeypatch, DataError("train.tsv: empty split")) == 2
    err = capsys.readouterr().err
    assert err.strip() == "prunekit boom: error: train.tsv: empty split"


def test_cli_bug_keeps_traceback(monkeypatch):
    with pytest.raises(ZeroDivisionError):
        _run_fake(monkeypatch, ZeroDivisionError("a real bug"))
    with pytest.raises(KeyError):                 # a KeyError is no longer mistaken for a user error
        _run_fake(monkeypatch, KeyError("x"))
