"""Recipes: YAML → typed, validated dataclasses.  Unknown keys and bad values fail before any work.

A recipe is parsed once, at the boundary (:func:`load_recipe`), with ``--set dotted.key=value``
overrides applied first (values parsed as YAML scalars).  Every section is a dataclass; a key that is
not a field raises :class:`RecipeError` naming the key and listing the valid ones; a value of the wrong
type or out of range names the key and the allowed values.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from prunekit.algorithms import get_algorithm_class
from prunekit.algorithms.calibration import MOVED_TO_CALIBRATION, CalibrationConfig
from prunekit.core.errors import RecipeError, UnknownNameError
from prunekit.core.plan import validate_overrides
from prunekit.core.quant import QuantSpec
from prunekit.core.structures import parse_structure
from prunekit.core.targets import DEFAULT_TYPES, TargetSpec
from prunekit.data.registry import canonical_dataset_name
from prunekit.data.user import is_user_data, validate_user_data
from prunekit.models.registry import list_models
from prunekit.models.user import is_import_path
from prunekit.training.config import TrainConfig, _choice, _range

__all__ = ["RecipeError", "Recipe", "TrainConfig", "ModelConfig", "DataConfig", "PruneConfig", "TargetsConfig",
           "AlgorithmConfig", "CalibrationConfig", "LogConfig", "load_recipe", "parse_recipe", "apply_overrides", "from_dict", "to_dict",
           "code_to_run"]


@dataclass
class ModelConfig:
    name: str = "lenet5"
    args: dict = field(default_factory=dict)      # keyword arguments of the model factory
    checkpoint: str | None = None                 # weights to start from: prunekit run folder or .safetensors file
    trust_remote_code: bool = False               # HF models: run the model repository's own code (opt-in)


@dataclass
class DataConfig:
    name: str = "mnist"
    root: str | None = None          # data folder; else $PRUNEKIT_DATA; else ../shared/data
    limit: int | None = None         # cap examples per split (seeded, class-stratified sample)
    eval_limit: int | None = None    # cap dev/test examples (default: limit)
    batch_size: int = 64
    eval_batch_size: int = 256
    max_length: int = 128            # NLP: tokens per example
    augment: bool = False            # CV: random crop + flip
    # the user's own data (see prunekit.data.user): name imagefolder | table | hf_disk, or a factory
    factory: str | None = None       # package.module:function -> (train_dataset, eval_dataset)
    factory_args: dict = field(default_factory=dict)   # keyword arguments of data.factory
    train: str | None = None         # table: train file (csv/tsv/jsonl); hf_disk: train split name
    eval: str | None = None          # table: eval file; hf_disk: eval split name
    format: str | None = None        # table: csv | tsv | jsonl (default: from the file extension)
    text_columns: list[str] = field(default_factory=list)   # table/hf_disk: [text] or [text_a, text_b]
    label_column: str = "label"      # table/hf_disk
    task_type: str = "classification"  # user data: classification | regression | causal_lm (text: language modelling)
    image_size: int | list[int] | None = None   # imagefolder: resize to N x N or [H, W]
    mean: list[float] | None = None  # imagefolder: per-channel normalisation (after scaling to [0, 1])
    std: list[float] | None = None
    grayscale: bool = False          # imagefolder: read as one channel

    def __post_init__(self):
        for k in ("limit", "eval_limit"):
            v = getattr(self, k)
            if v is not None:
                _range(k, v, 1, None)
        _range("batch_size", self.batch_size, 1, None)
        _range("eval_batch_size", self.eval_batch_size, 1, None)
        _range("max_length", self.max_length, 8, None)
        _choice("task_type", self.task_type, ("classification", "regression", "causal_lm"))
        if self.format is not None:
            _choice("format", self.format, ("csv", "tsv", "jsonl", "txt"))
        if isinstance(self.image_size, list) and len(self.image_size) != 2:
            raise RecipeError(f"image_size: expected an int or [height, width], got {self.image_size!r}")
        for v in [self.image_size] if isinstance(self.image_size, int) else (self.image_size or []):
            _range("image_size", v, 1, None)
        for v in self.std or []:
            _range("std", v, 0, None, lo_open=True)


@dataclass
class TargetsConfig:
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=lambda: list(DEFAULT_TYPES))

    @property
    def is_default(self) -> bool:
        """Nothing chosen (``include: ["*"]``, no excludes): HF workloads use the family's default targets."""
        return list(self.include) == ["*"] and not self.exclude


@dataclass
class PruneConfig:
    structure: str = "unstructured"
    sparsity: float = 0.5
    score: str = "l2"
    scope: str = "layer"             # layer | global
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    overrides: dict = field(default_factory=dict)   # {param_name_pattern: sparsity | {sparsity, structure}}
    # group structures (channels | heads | kv_groups | neurons, '+'-combined) only:
    min_keep: int = 1                # units kept at least per group
    multiple_of: int = 1             # kept counts rounded to a multiple (e.g. 8)
    uniform: bool = False            # the same kept count in every group of a kind
    ignore: list = field(default_factory=list)      # group name patterns left dense

    def __post_init__(self):
        try:
            st = parse_structure(self.structure)
        except ValueError as e:
            raise RecipeError(f"structure: {e}") from None
        for k in ("min_keep", "multiple_of"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RecipeError(f"prune.{k}: expected an integer >= 1, got {v!r}")
        if not isinstance(self.uniform, bool):
            raise RecipeError(f"prune.uniform: expected true or false, got {self.uniform!r}")
        if not isinstance(self.ignore, list) or not all(isinstance(x, str) for x in self.ignore):
            raise RecipeError(f"prune.ignore: expected a list of group name patterns, got {self.ignore!r}")
        if not st.coupled and (self.min_keep != 1 or self.multiple_of != 1 or self.uniform or self.ignore):
            raise RecipeError(f"prune.min_keep/multiple_of/uniform/ignore apply to group structures "
                              f"(channels, heads, kv_groups, neurons), not {st}")
        _range("sparsity", self.sparsity, 0, 1, hi_open=True)
        _choice("scope", self.scope, ("layer", "global"))
        try:
            validate_overrides(self.overrides)
        except ValueError as e:
            raise RecipeError(str(e)) from None


@dataclass
class QuantConfig:
    """Joint pruning + quantization (docs/quantization.md).  ``scheme`` (a quantizer string: ``int:4``,
    ``pow2:3``, ``binary``, ``ternary``, ``cluster:16``, ``fp16``…; none = no quantization) for every target,
    ``overrides`` ``{name_pattern: quantizer}``, ``targets`` (default: prune's), ``method`` — how the kept
    weights reach the grid after hard-pruning: ``qat`` (retraining with a straight-through estimator),
    ``share`` (Deep Compression weight sharing, ``cluster:K``), ``rtn`` (round-to-nearest, no training) —
    ``schedule``: the schemes of the earlier stages of an ADMM search (e.g. ``[int:8, int:4]``), ``reduce``:
    ``mean`` | ``sum`` of the members' updates (``share``), ``entropy``: ``huffman`` or ``lzma`` to entropy-code the artefact."""

    scheme: str | None = None
    overrides: dict = field(default_factory=dict)
    targets: TargetsConfig | None = None
    method: str = "qat"
    schedule: list = field(default_factory=list)
    reduce: str = "mean"
    entropy: str | None = None       # None | huffman | lzma: entropy-code codes and gaps in the artefact (model.pkq)
    polarize: int = 0                # FORMS sign polarization: K consecutive weights of a column share one sign

    def __post_init__(self):
        _choice("quant.method", self.method, ("qat", "share", "rtn"))
        if self.entropy is not None:
            _choice("quant.entropy", self.entropy, ("huffman", "lzma"))
        _choice("quant.reduce", self.reduce, ("mean", "sum"))
        if self.scheme is not None:
            self.spec(None)
        elif self.overrides or self.schedule or self.polarize:
            raise RecipeError("quant.overrides/schedule need quant.scheme")

    def spec(self, default_targets) -> QuantSpec:
        """The :class:`QuantSpec` (``default_targets``: prune's :class:`TargetSpec`, used without quant.targets)."""
        t = self.targets
        targets = TargetSpec(list(t.include), list(t.exclude), list(t.types)) if t is not None else default_targets
        try:
            return QuantSpec(str(self.scheme), dict(self.overrides), targets, [str(x) for x in self.schedule],
                             self.polarize)
        except RecipeError as e:
            msg = str(e)
            raise RecipeError(msg if msg.startswith("quant.") else f"quant.scheme: {msg}") from None


@dataclass
class AlgorithmConfig:
    name: str = "oneshot"
    params: dict = field(default_factory=dict)  # validated by the algorithm's own Params dataclass


@dataclass
class LogConfig:
    tensorboard: bool = False        # write loss, metric, lr, sparsity per step to out_dir/tb
    progress_every_s: float = 30.0   # progress line interval when not on a terminal (log files, CI); 0 = off
    progress_every_steps: int = 0    # ... and/or every N steps; 0 = off

    def __post_init__(self):
        _range("progress_every_s", self.progress_every_s, 0, None)
        _range("progress_every_steps", self.progress_every_steps, 0, None)


@dataclass
class Recipe:
    name: str = "run"
    seed: int = 0
    task: str = "classification"     # classification | glue
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)     # quantization of the kept weights (optional)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)   # post-training algorithms' data
    train: TrainConfig = field(default_factory=TrainConfig)
    dense: dict = field(default_factory=dict)     # TrainConfig keys overriding `train` for dense training
    search: dict = field(default_factory=dict)    # ... for the algorithm's own phase (ADMM, SLR, gradual, ...)
    retrain: dict = field(default_factory=dict)   # ... for hard-pruned retraining
    distill: dict = field(default_factory=dict)   # knowledge distillation (see prunekit.algorithms.distill)
    extra: dict = field(default_factory=dict)     # copied to results; extra.shared is typed (pipelines.shared.SharedConfig)
    checkpoint_every: int = 0        # also checkpoint the run state every N optimizer steps (0 = per epoch only)
    device: str = "auto"             # auto | cpu | cuda | cuda:N | mps  (auto = CUDA when available)
    precision: str = "fp32"          # fp32 | bf16 | fp16 (torch.autocast; fp16 needs CUDA)
    threads: int | None = None       # torch.set_num_threads (CPU intra-op threads); None = torch's default
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        _choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        if not _DEVICE.fullmatch(str(self.device).strip().lower()):
            raise RecipeError(f"device: {self.device!r} is not one of ['auto', 'cpu', 'cuda', 'cuda:N', 'mps']")
        if self.threads is not None:
            _range("threads", self.threads, 1, None)
        _choice("task", self.task, ("classification", "glue"))
        _range("seed", self.seed, 0, 2**63 - 1)
        _range("checkpoint_every", self.checkpoint_every, 0, None)
        for phase in ("dense", "search", "retrain"):
            self.phase(phase)  # validates

    def phase(self, name: str) -> TrainConfig:
        """The resolved :class:`TrainConfig` of a phase (``train`` defaults + the phase's overrides)."""
        base = dataclasses.asdict(self.train)
        over = getattr(self, name)
        bad = set(over) - set(base)
        if bad:
            raise RecipeError(f"unknown key(s) {sorted(f'{name}.{k}' for k in bad)}; valid: {sorted(base)}")
        base.update(over)
        return from_dict(TrainConfig, base, name)


_DEVICE = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")
_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(tp, value, key):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except RecipeError as e:
                errs.append(str(e))
        raise RecipeError(errs[0] if errs else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        (a,) = typing.get_args(tp) or (Any,)
        return [_coerce(a, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            value = float(value)   # YAML 1.1 reads "1e-4" (no dot) as a string; users mean the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, data, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys / bad values raise :class:`RecipeError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise RecipeError(f"unknown recipe key {where}{unknown[0]!s}; valid keys{' of ' + prefix if prefix else ''}: {names}")
    kw = {}
    for k, v in data.items():
        kw[k] = _coerce(hints[k], v, f"{prefix}.{k}" if prefix else k)
    try:
        return cls(**kw)
    except RecipeError as e:
        msg = str(e)
        raise RecipeError(f"{prefix}.{msg}" if prefix and not msg.startswith(prefix) else msg) from None
    except (ValueError, TypeError) as e:   # a Params.__post_init__ comparing a bad value
        raise RecipeError(f"{prefix}: {e}" if prefix else str(e)) from None


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _parse_scalar(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` strings to a raw recipe mapping (values parsed as YAML)."""
    raw = copy.deepcopy(raw)
    for ov in overrides or []:
        if "=" not in ov:
            raise RecipeError(f"--set expects dotted.key=value, got {ov!r}")
        key, val = ov.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise RecipeError(f"--set {ov!r}: empty key")
        d = raw
        for p in parts[:-1]:
            if d.get(p) is None:
                d[p] = {}
            if not isinstance(d[p], dict):
                raise RecipeError(f"--set {ov!r}: {p} is not a section")
            d = d[p]
        d[parts[-1]] = _parse_scalar(val)
    return raw


def parse_recipe(raw: dict, overrides: list[str] | None = None) -> Recipe:
    raw = apply_overrides(raw or {}, overrides or [])
    recipe = from_dict(Recipe, raw)
    # validate the algorithm's own parameters and the prune spec now, before any work
    try:
        cls = get_algorithm_class(recipe.algorithm.name)
    except UnknownNameError as e:
        raise RecipeError(f"algorithm.name: {e}") from None
    moved = sorted(set(recipe.algorithm.params) & set(MOVED_TO_CALIBRATION) - {f.name for f in fields(cls.Params)})
    if moved:
        raise RecipeError(f"algorithm.params.{moved[0]} moved to the top-level calibration section: "
                          f"calibration.{MOVED_TO_CALIBRATION[moved[0]]}")
    from_dict(cls.Params, recipe.algorithm.params, "algorithm.params")
    if is_user_data(recipe.data):
        validate_user_data(recipe.data, recipe.model.name)
    elif recipe.task == "classification":
        if recipe.model.name not in list_models() and not is_import_path(recipe.model.name):
            raise RecipeError(f"model.name: unknown model {recipe.model.name!r}; valid: {list_models()} "
                              "or an import path package.module:factory")
        try:
            canonical_dataset_name(recipe.data.name)
        except UnknownNameError as e:
            raise RecipeError(f"data.name: {e}") from None
    return recipe


def code_to_run(recipe: Recipe) -> list[str]:
    """What building ``recipe``'s workload would run besides prunekit: the import paths of its model and
    data factories and a Hugging Face repository's own code (``model.trust_remote_code``).  Opening a
    stored run folder (``prunekit compact`` / ``bench``) needs the user's consent for each."""
    out = []
    if is_import_path(recipe.model.name):
        out.append(f"import the model factory {recipe.model.name!r} (model.name)")
    if recipe.data.factory and is_import_path(recipe.data.factory):
        out.append(f"import the data factory {recipe.data.factory!r} (data.factory)")
    if recipe.model.trust_remote_code:
        out.append(f"run the Hugging Face repository code of {recipe.model.name!r} (model.trust_remote_code)")
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {p} is not valid YAML: {e}") from None
    if raw is not None and not isinstance(raw, dict):
        raise RecipeError(f"recipe {p} must be a mapping at the top level")
    return parse_recipe(raw or {}, overrides)
