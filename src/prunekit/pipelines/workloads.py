"""Workloads: the model, task and data loaders a recipe describes."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.adapters.hf import GlueTaskAdapter, load_model, load_tokenizer, uses_token_types
from prunekit.core.errors import RecipeError
from prunekit.core.registry import Registry
from prunekit.data.glue import encode_examples, get_task, load_glue, make_loader
from prunekit.data.registry import get_dataset
from prunekit.data.user import is_user_data
from prunekit.graph.families import default_targets
from prunekit.models.user import build_model
from prunekit.pipelines.recipe import Recipe
from prunekit.pipelines.user_workloads import build_user_workload
from prunekit.training.tasks import ClassificationTask


def build_glue_workload(recipe: Recipe):
    """Model + tokenised GLUE loaders for a ``task: glue`` recipe (called by the runner).

    ``data.limit`` = a class-stratified random subset (seeded by ``recipe.seed``) of the training set; dev
    is cut the same way to ``data.eval_limit`` (default: ``data.limit``, as for every dataset — set
    ``eval_limit`` high to score on the full dev set).  Batches are length-bucketed and padded per batch
    (:func:`prunekit.data.glue.make_loader`); sequences are truncated to ``data.max_length``.
    When the recipe's targets are the default (``["*"]``), they become :func:`default_targets`."""

    d = recipe.data
    try:
        spec = get_task(d.name)
    except (KeyError, ValueError) as e:
        raise RecipeError(f"data.name: {e.args[0]}") from None
    train = load_glue(spec, d.root, "train", limit=d.limit, seed=recipe.seed)
    dev = load_glue(spec, d.root, "dev", limit=d.eval_limit or d.limit, seed=recipe.seed)
    args = dict(recipe.model.args)
    num_labels = int(args.pop("num_labels", spec.num_labels))
    if num_labels != spec.num_labels:
        raise RecipeError(f"model.args.num_labels={num_labels} but {spec.display} needs {spec.num_labels}")
    trust = recipe.model.trust_remote_code
    model = load_model(recipe.model.name, num_labels, trust_remote_code=trust, **args)
    tok = load_tokenizer(recipe.model.name, trust_remote_code=trust)
    enc_train = encode_examples(train, tok, d.max_length)
    enc_dev = encode_examples(dev, tok, d.max_length)
    if not uses_token_types(model):  # DistilBERT takes none; RoBERTa has a single token type
        for f in enc_train.features + enc_dev.features:
            f.pop("token_type_ids", None)
    train_loader = make_loader(enc_train, d.batch_size, shuffle=True, seed=recipe.seed)
    eval_loader = make_loader(enc_dev, d.eval_batch_size)
    if recipe.prune.targets.is_default:
        ts = default_targets(model)
        recipe.prune.targets.include = list(ts.include)
        recipe.prune.targets.types = list(ts.types)
    example = next(iter(make_loader(enc_dev, 1)))
    example.pop("labels")
    info = {"task": spec.name, "train_examples": len(enc_train), "eval_examples": len(enc_dev),
            "max_length": d.max_length, "model": recipe.model.name,
            "targets": list(recipe.prune.targets.include)}
    return Workload(model, GlueTaskAdapter(spec), train_loader, eval_loader, example, info)


# --------------------------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """Everything a run trains and measures."""

    model: nn.Module
    task: Any                      # .step / .evaluate / .metric
    train_loader: Any
    eval_loader: Any
    example_input: Any = None      # for FLOPs
    info: dict = dataclasses.field(default_factory=dict)


def _classification_workload(recipe: Recipe) -> Workload:

    d = recipe.data
    train = get_dataset(d.name, root=d.root, split="train", limit=d.limit, seed=recipe.seed,
                        **({"augment": True} if d.augment else {}))
    test = get_dataset(d.name, root=d.root, split="test", limit=d.eval_limit or d.limit, seed=recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    train_loader = torch.utils.data.DataLoader(train, batch_size=d.batch_size, shuffle=True, generator=g)
    eval_loader = torch.utils.data.DataLoader(test, batch_size=d.eval_batch_size)
    n_classes = len(getattr(train, "classes", ())) or 10
    model = build_model(recipe.model.name, recipe.model.args, num_classes=n_classes)  # built-in or import path
    x0 = train[0][0].unsqueeze(0)
    info = {"train_examples": len(train), "eval_examples": len(test)}
    if getattr(train, "note", None):
        info["data_note"] = train.note
    return Workload(model, ClassificationTask(), train_loader, eval_loader, x0, info)


TASKS: Registry[Callable[[Recipe], Workload]] = Registry("task")
TASKS.add("classification", _classification_workload)
TASKS.add("glue", build_glue_workload)


def build_workload(recipe: Recipe) -> Workload:
    """The workload of ``recipe.task`` (a :data:`TASKS` entry), or of the user's own data (imagefolder /
    table / hf_disk / data.factory: :mod:`prunekit.pipelines.user_workloads`)."""
    if is_user_data(recipe.data):
        return Workload(*build_user_workload(recipe))
    return TASKS.get(recipe.task)(recipe)
