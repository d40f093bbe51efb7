"""Workloads for the user's own data: ``imagefolder``, ``table``, ``hf_disk`` and ``data.factory``
(which recipes, which keys and models: :mod:`prunekit.data.user`).

:func:`build_user_workload` returns a :class:`UserWorkload` (the fields of
:class:`prunekit.pipelines.workloads.Workload`, which wraps it), with a :class:`UserTask`: cross-entropy
or MSE by ``data.task_type``, metrics from :mod:`prunekit.data.task_metrics` in **percent**.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from prunekit.adapters.hf import is_causal_lm_source, load_causal_lm, load_model, load_tokenizer, uses_token_types
from prunekit.core.errors import DataError, RecipeError
from prunekit.data.factory import load_factory
from prunekit.data.glue import encode_examples, make_loader
from prunekit.data.imagefolder import load_imagefolder
from prunekit.data.lm_text import LMWindows, read_hf_disk_texts, read_texts, separator_id, token_windows
from prunekit.data.paths import resolve_data_root
from prunekit.data.sample import subsample
from prunekit.data.table import load_hf_disk, load_table_splits
from prunekit.data.task_metrics import primary_metric, task_metrics
from prunekit.data.user import TEXT_DATASETS, user_data_kind
from prunekit.graph.families import default_targets
from prunekit.models.user import build_model
from prunekit.pipelines.recipe import Recipe
from prunekit.training.tasks import CausalLMTask

__all__ = ["UserTask", "UserWorkload", "build_user_workload", "is_lm_recipe", "lm_windows"]


class UserWorkload(NamedTuple):
    """The parts of a :class:`~prunekit.pipelines.workloads.Workload`, in its field order."""

    model: nn.Module
    task: Any
    train_loader: Any
    eval_loader: Any
    example_input: Any
    info: dict


# --------------------------------------------------------------------------------------------- task
class UserTask:
    """The training-loop task for user data.  Batches are ``(input, labels)`` pairs (``input`` a tensor
    or a dict of keyword arguments) or dicts with ``labels`` (tokenised text).  Classification uses
    cross-entropy, regression the mean squared error of the single output; ``evaluate`` returns
    :func:`~prunekit.data.task_metrics.task_metrics` (percent) plus ``loss`` and ``examples``."""

    def __init__(self, task_type: str = "classification", num_classes: int | None = None, text: bool = False):
        self.task_type, self.num_classes = task_type, num_classes
        self.metric = primary_metric(task_type)
        if text:
            self.output_hidden_states = False      # hidden-state distillation is possible for HF models

    @property
    def is_regression(self) -> bool:
        return self.task_type == "regression"

    @staticmethod
    def split(batch) -> tuple[Any, Tensor]:
        if isinstance(batch, Mapping):
            return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
        x, y = batch
        return x, y

    def forward(self, model: nn.Module, batch, output_hidden_states: bool | None = None):
        x, _ = self.split(batch)
        if isinstance(x, Mapping):
            ohs = getattr(self, "output_hidden_states", False) if output_hidden_states is None else output_hidden_states
            return model(**x, output_hidden_states=ohs) if hasattr(self, "output_hidden_states") else model(**x)
        return model(x)

    @staticmethod
    def logits(outputs) -> Tensor:
        return outputs.logits if hasattr(outputs, "logits") else outputs

    def loss(self, logits: Tensor, batch) -> Tensor:
        _, y = self.split(batch)
        if self.is_regression:
            return nn.functional.mse_loss(logits.reshape(-1).float(), y.float())
        return nn.functional.cross_entropy(logits, y)

    def step(self, model: nn.Module, batch):
        out = self.forward(model, batch)
        return self.loss(self.logits(out), batch), out

    def batch_size(self, batch) -> int:
        return len(self.split(batch)[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        was = model.training
        model.eval()
        outs, labels, loss = [], [], 0.0
        for batch in loader:
            lg = self.logits(self.forward(model, batch, output_hidden_states=False))
            loss += float(self.loss(lg, batch)) * self.batch_size(batch)
            outs.append(lg.float())
            labels.append(self.split(batch)[1])
        model.train(was)
        lg, y = torch.cat(outs), torch.cat(labels)
        out = task_metrics(self.task_type, lg, y, None if self.is_regression else self.num_classes)
        out["loss"] = loss / max(len(y), 1)
        out["examples"] = int(len(y))
        return out


# --------------------------------------------------------------------------------------------- workloads
def _check_outputs(model: nn.Module, x: Any, n_out: int, what: str) -> None:
    """One forward pass on an example: the model must give ``n_out`` values per example."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**x) if isinstance(x, Mapping) else model(x)
    except Exception as e:  # noqa: BLE001 - surface a shape problem before training
        raise RecipeError(f"model {type(model).__name__} fails on an example input of the data set "
                          f"({what}): {type(e).__name__}: {e}") from None
    finally:
        model.train(was)
    out = UserTask.logits(out)
    got = out.shape[-1] if out.dim() > 1 else 1
    if got != n_out:
        raise RecipeError(f"model {type(model).__name__} gives {got} output(s) per example but the data set "
                          f"needs {n_out} ({what})")


def _image_workload(recipe: Recipe) -> UserWorkload:
    d = recipe.data
    assert d.root is not None, "imagefolder needs data.root (checked with the recipe)"
    train = load_imagefolder(d.root, "train", limit=d.limit, augment=d.augment, seed=recipe.seed,
                             image_size=d.image_size, mean=d.mean, std=d.std, grayscale=d.grayscale)
    val = load_imagefolder(d.root, "val", limit=d.eval_limit or d.limit, seed=recipe.seed,
                           image_size=d.image_size, mean=d.mean, std=d.std, grayscale=d.grayscale)
    model = build_model(recipe.model.name, recipe.model.args, num_classes=train.num_classes)
    x0 = train.images[:1]
    _check_outputs(model, x0, train.num_classes, f"{train.num_classes} classes {list(train.classes)}")
    g = torch.Generator().manual_seed(recipe.seed)
    info = {"data": "imagefolder", "root": str(Path(d.root).expanduser()), "classes": list(train.classes),
            "train_examples": len(train), "eval_examples": len(val), "image_shape": list(x0.shape[1:])}
    return UserWorkload(model, UserTask("classification", train.num_classes),
                    torch.utils.data.DataLoader(train, batch_size=d.batch_size, shuffle=True, generator=g),
                    torch.utils.data.DataLoader(val, batch_size=d.eval_batch_size), x0, info)


def _factory_workload(recipe: Recipe) -> UserWorkload:
    d = recipe.data
    assert d.factory is not None, "a factory workload needs data.factory (checked with the recipe)"
    fd = load_factory(d.factory, d.factory_args, d.task_type).limited(d.limit, d.eval_limit or d.limit, recipe.seed)
    train, ev = fd.train, fd.eval
    n_classes = None if d.task_type == "regression" else fd.num_classes
    model = build_model(recipe.model.name, recipe.model.args, num_classes=n_classes)
    x0 = torch.utils.data.default_collate([train[0]])[0]
    _check_outputs(model, x0, fd.num_classes, d.task_type)
    g = torch.Generator().manual_seed(recipe.seed)
    info = {"data": f"factory {d.factory}", "task_type": d.task_type, "num_classes": fd.num_classes,
            "train_examples": len(train), "eval_examples": len(ev)}
    return UserWorkload(model, UserTask(d.task_type, n_classes),
                    torch.utils.data.DataLoader(train, batch_size=d.batch_size, shuffle=True, generator=g),
                    torch.utils.data.DataLoader(ev, batch_size=d.eval_batch_size), x0, info)


def _table_path(d, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or not d.root else Path(d.root).expanduser() / p


def _text_splits(recipe: Recipe):
    d = recipe.data
    if user_data_kind(recipe.data) == "hf_disk":
        assert d.root is not None, "hf_disk needs data.root (checked with the recipe)"
        train, ev = load_hf_disk(d.root, d.text_columns, d.label_column, d.task_type, d.train, d.eval)
    else:
        assert d.train is not None and d.eval is not None, "table needs data.train and data.eval (checked with the recipe)"
        train, ev = load_table_splits(_table_path(d, d.train), _table_path(d, d.eval), d.text_columns,
                                      d.label_column, d.task_type, d.format)
    regression = d.task_type == "regression"
    return (subsample(train, d.limit, recipe.seed, regression=regression),
            subsample(ev, d.eval_limit or d.limit, recipe.seed, regression=regression))


def _text_workload(recipe: Recipe) -> UserWorkload:
    d = recipe.data
    train, ev = _text_splits(recipe)
    args = dict(recipe.model.args)
    num_labels = int(args.pop("num_labels", train.num_labels))
    if num_labels != train.num_labels:
        raise RecipeError(f"model.args.num_labels={num_labels} but the data set needs {train.num_labels} "
                          f"({'regression' if train.is_regression else f'classes {list(train.label_names)}'})")
    trust = recipe.model.trust_remote_code
    model = load_model(recipe.model.name, num_labels, trust_remote_code=trust, **args)
    tok = load_tokenizer(recipe.model.name, trust_remote_code=trust)
    enc_train = encode_examples(train.examples, tok, d.max_length, is_regression=train.is_regression)
    enc_eval = encode_examples(ev.examples, tok, d.max_length, is_regression=train.is_regression)
    if not uses_token_types(model):
        for f in enc_train.features + enc_eval.features:
            f.pop("token_type_ids", None)
    if recipe.prune.targets.is_default:
        ts = default_targets(model)
        recipe.prune.targets.include, recipe.prune.targets.types = list(ts.include), list(ts.types)
    example = next(iter(make_loader(enc_eval, 1)))
    example.pop("labels")
    info = {"data": user_data_kind(recipe.data), "train": train.path, "eval": ev.path, "task_type": train.task_type,
            "labels": list(train.label_names), "train_examples": len(enc_train), "eval_examples": len(enc_eval),
            "max_length": d.max_length, "model": recipe.model.name, "targets": list(recipe.prune.targets.include)}
    task = UserTask(train.task_type, None if train.is_regression else train.num_labels, text=True)
    return UserWorkload(model, task, make_loader(enc_train, d.batch_size, shuffle=True, seed=recipe.seed),
                    make_loader(enc_eval, d.eval_batch_size), example, info)


def is_lm_recipe(recipe: Recipe) -> bool:
    """Language modelling: ``task_type: causal_lm``, ``data.name: text``, or a decoder model on hf_disk text."""
    kind = user_data_kind(recipe.data)
    return (recipe.data.task_type == "causal_lm" or kind == "text"
            or (kind == "hf_disk" and is_causal_lm_source(recipe.model.name)))


def _lm_path(d, path: str) -> Path:
    """A text file: absolute, relative to ``data.root``, to the working folder, else to the data root."""
    p = _table_path(d, path)
    if p.is_absolute() or d.root or p.exists():
        return p
    return Path(resolve_data_root(None)) / p


def _lm_texts(recipe: Recipe) -> tuple[list[str], list[str], str, str]:
    d = recipe.data
    col = d.text_columns[0] if d.text_columns else None
    if user_data_kind(d) == "hf_disk":
        assert d.root is not None, "hf_disk needs data.root (checked with the recipe)"
        tr, ev = d.train or "train", d.eval or "validation"
        return (read_hf_disk_texts(d.root, tr, col), read_hf_disk_texts(d.root, ev, col), f"{d.root}[{tr}]",
                f"{d.root}[{ev}]")
    assert d.train is not None and d.eval is not None, "text needs data.train and data.eval (checked with the recipe)"
    tp, ep = _lm_path(d, d.train), _lm_path(d, d.eval)
    return read_texts(tp, d.format, col), read_texts(ep, d.format, col), str(tp), str(ep)


def lm_windows(recipe: Recipe) -> tuple[LMWindows, LMWindows, Any]:
    """``(train, eval, tokenizer)``: token windows of ``data.max_length`` from the train/eval texts.
    ``data.limit`` = a seeded random subset of the train windows; ``eval_limit`` = the first eval windows."""
    d = recipe.data
    tok = load_tokenizer(recipe.model.name, trust_remote_code=recipe.model.trust_remote_code)
    train_texts, eval_texts, tpath, epath = _lm_texts(recipe)
    train_w = token_windows(train_texts, tok, d.max_length)
    eval_w = token_windows(eval_texts, tok, d.max_length)
    if d.limit is not None and d.limit < len(train_w):
        g = torch.Generator().manual_seed(recipe.seed)
        train_w = train_w[torch.randperm(len(train_w), generator=g)[:d.limit]]
    return LMWindows(train_w, tpath), LMWindows(eval_w[: d.eval_limit or d.limit], epath), tok


def check_vocab(model: nn.Module, tokenizer: Any, name: str) -> None:
    """Refuse a tokenizer that produces ids the model has no embedding for (an IndexError deep in the forward)."""
    emb = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
    if emb < len(tokenizer):
        raise RecipeError(f"model {name!r} has {emb} token embeddings but its tokenizer {len(tokenizer)} tokens "
                          "(ids up to the tokenizer's size would index past the embedding)")


def _lm_workload(recipe: Recipe) -> UserWorkload:
    """Token windows (:func:`lm_windows`), a causal LM, perplexity per token."""
    d = recipe.data
    trust = recipe.model.trust_remote_code
    train, ev, tok = lm_windows(recipe)
    train_w, tpath, epath = train.windows, train.path, ev.path
    model = load_causal_lm(recipe.model.name, len(tok), trust_remote_code=trust, eos_token_id=separator_id(tok),
                           **dict(recipe.model.args))
    check_vocab(model, tok, recipe.model.name)
    if recipe.prune.targets.is_default:
        ts = default_targets(model)
        recipe.prune.targets.include, recipe.prune.targets.types = list(ts.include), list(ts.types)
    g = torch.Generator().manual_seed(recipe.seed)
    info = {"data": user_data_kind(d), "train": tpath, "eval": epath, "task_type": "causal_lm",
            "window": d.max_length, "train_windows": len(train), "eval_windows": len(ev),
            "eval_tokens_predicted": len(ev) * (d.max_length - 1), "tokenizer": type(tok).__name__,
            "model": recipe.model.name, "targets": list(recipe.prune.targets.include)}
    return UserWorkload(model, CausalLMTask(),
                        torch.utils.data.DataLoader(train, batch_size=d.batch_size, shuffle=True, generator=g),
                        torch.utils.data.DataLoader(ev, batch_size=d.eval_batch_size), {"input_ids": train_w[:1]},
                        info)


def build_user_workload(recipe: Recipe) -> UserWorkload:
    """The workload parts of a user-data recipe (see :mod:`prunekit.data.user`)."""
    kind = user_data_kind(recipe.data)
    if is_lm_recipe(recipe):
        return _lm_workload(recipe)
    if kind == "imagefolder":
        return _image_workload(recipe)
    if kind == "factory":
        return _factory_workload(recipe)
    if kind in TEXT_DATASETS:
        return _text_workload(recipe)
    raise DataError(f"data.name {recipe.data.name!r} is not user data")
