"""Which recipes use the user's own data, and the checks of their ``data``/``model`` keys that need no files.

A recipe uses the user's data when ``data.name`` is one of :data:`USER_DATASETS` or ``data.factory``
is set (``data.name`` may then be left out or be ``factory``).  ``recipe.task`` is not used for them;
``data.task_type`` (``classification`` | ``regression``) decides the loss and the metrics.

=============  ==========================================  ==============================================
data.name      model.name                                  data keys
=============  ==========================================  ==============================================
imagefolder    built-in name or import path                root (holds train/ and val/), image_size, mean,
                                                           std, grayscale, augment
table          HF: minilm-l6, *-config, folder, hub name   train, eval (files; relative to root if given),
                                                           format, text_columns, label_column, task_type
hf_disk        HF (as table)                               root (save_to_disk folder), train/eval (split
                                                           names), text_columns, label_column, task_type
text           HF causal LM: llama-config, gpt2-config,   train, eval (txt / jsonl / csv / tsv files),
               a model folder, hub name                    format, text_columns ([field]), max_length
(factory)      built-in name or import path                factory, factory_args, task_type
=============  ==========================================  ==============================================

``task_type: causal_lm`` (language modelling; implied by ``data.name: text`` and by a model whose config
names an ``*ForCausalLM`` architecture) reads ``text`` files or an ``hf_disk`` folder as token windows
(:mod:`prunekit.data.lm_text`) and scores perplexity per token (lower is better).

Import paths (``model.name`` and ``data.factory``) **import and run the user's code**.  The readers are
:mod:`prunekit.data.imagefolder`, :mod:`prunekit.data.table` and :mod:`prunekit.data.factory`; the
workloads :mod:`prunekit.pipelines.user_workloads`.
"""
from __future__ import annotations

from typing import Any

from prunekit.core.errors import RecipeError
from prunekit.models.registry import list_models
from prunekit.models.user import is_import_path

__all__ = ["USER_DATASETS", "TEXT_DATASETS", "user_data_kind", "is_user_data", "validate_user_data"]

USER_DATASETS = ("imagefolder", "table", "hf_disk", "text")
TEXT_DATASETS = ("table", "hf_disk", "text")
_IMAGE_KEYS = ("image_size", "mean", "std", "grayscale")


def user_data_kind(data: Any) -> str | None:
    """``imagefolder`` / ``table`` / ``hf_disk`` / ``factory`` for a recipe's ``data`` section, or
    ``None`` for a built-in data set."""
    if data.factory:
        return "factory"
    name = data.name.strip().lower()
    return name if name in USER_DATASETS or name == "factory" else None


def is_user_data(data: Any) -> bool:
    return user_data_kind(data) is not None


def _check_data_keys(d: Any, kind: str) -> None:
    if d.factory and d.name.strip().lower() not in ("mnist", "factory"):
        raise RecipeError(f"data.factory is set, so data.name must be left out (or be 'factory'), got {d.name!r}")
    if kind == "factory" and not d.factory:
        raise RecipeError("data.name: factory needs data.factory: package.module:function")
    if d.factory and not is_import_path(d.factory):
        raise RecipeError(f"data.factory: {d.factory!r} is not an import path package.module:function")
    set_image = [k for k in _IMAGE_KEYS if getattr(d, k) not in (None, False)]
    if set_image and kind != "imagefolder":
        raise RecipeError(f"data.{set_image[0]} is an imagefolder option; data.name is {kind!r}")
    if kind == "text" or d.task_type == "causal_lm":
        _check_lm_keys(d, kind)
    elif kind in TEXT_DATASETS:
        if not 1 <= len(d.text_columns) <= 2:
            raise RecipeError(f"data.text_columns: {kind} needs one text column or a pair, e.g. [sentence] or "
                              f"[sentence1, sentence2]; got {d.text_columns}")
    elif d.text_columns:
        raise RecipeError(f"data.text_columns is a table/hf_disk option; data.name is {kind!r}")
    if kind == "table" and not (d.train and d.eval):
        raise RecipeError("data.train and data.eval: a table needs both files (csv, tsv or jsonl)")
    if kind in ("imagefolder", "hf_disk") and not d.root:
        raise RecipeError(f"data.root: {kind} needs data.root = the folder "
                          f"{'holding train/ and val/' if kind == 'imagefolder' else 'written by save_to_disk'}")
    if kind == "imagefolder" and d.task_type != "classification":
        raise RecipeError("data.task_type: imagefolder is classification only")


def _check_lm_keys(d: Any, kind: str) -> None:
    if kind not in ("text", "hf_disk"):
        raise RecipeError(f"data.task_type causal_lm reads text files (data.name: text) or an hf_disk folder, "
                          f"not {kind!r}")
    if kind == "text" and d.task_type not in ("classification", "causal_lm"):
        raise RecipeError(f"data.name text is language modelling (task_type causal_lm), got task_type {d.task_type!r}")
    if len(d.text_columns) > 1:
        raise RecipeError(f"data.text_columns: language modelling reads one text field, got {d.text_columns}")
    if kind == "text" and not (d.train and d.eval):
        raise RecipeError("data.train and data.eval: a text data set needs both files (txt, jsonl, csv or tsv)")
    if d.format not in (None, "txt", "jsonl", "csv", "tsv"):
        raise RecipeError(f"data.format: {d.format!r} is not one of ['txt', 'jsonl', 'csv', 'tsv']")


def validate_user_data(data: Any, model_name: str) -> None:
    """The keys each kind of user data needs, and a model of the right kind for it (:class:`RecipeError`)."""
    kind = user_data_kind(data)
    if kind is None:
        raise RecipeError(f"data.name {data.name!r} is not user data ({', '.join(USER_DATASETS)} or data.factory)")
    _check_data_keys(data, kind)
    if kind in TEXT_DATASETS:
        if is_import_path(model_name) or model_name in list_models():
            raise RecipeError(f"model.name: {kind} data is tokenised, so it needs a Hugging Face model (minilm-l6, "
                              f"bert-base-config, a model folder or hub name), got {model_name!r}")
    elif not (is_import_path(model_name) or model_name in list_models()):
        raise RecipeError(f"model.name: {model_name!r} is neither a built-in model {list_models()} nor an import "
                          "path package.module:factory")
