"""Coupling rules per ATen op (registered into :data:`prunekit.graph.analyze.RULES`)."""
from __future__ import annotations

from typing import Any, cast

from torch import fx

from .analyze import (
    RULES,
    Analysis,
    Dims,
    _flag_outputs,
    _opaque,
    _shape,
    _where,
    broadcast,
    op_name,
    reshape_dims,
    rule,
)
from .trace import Traced

_UNARY = ("relu", "relu_", "gelu", "gelu_", "silu", "silu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "neg",
          "hardtanh", "hardtanh_", "hardswish", "hardswish_", "hardsigmoid", "leaky_relu", "leaky_relu_", "elu",
          "elu_", "mish", "rsqrt", "sqrt", "exp", "log", "erf", "abs", "cos", "sin", "reciprocal", "square",
          "dropout", "dropout_", "feature_dropout", "alpha_dropout", "alias", "clone", "contiguous", "to",
          "_to_copy", "detach", "lift_fresh_copy", "clamp", "clamp_", "clamp_min", "clamp_max", "pow",
          "type_as", "float", "half", "bfloat16", "fill", "zeros_like", "ones_like", "full_like",
          "logical_not", "bitwise_not", "isnan", "nan_to_num", "sign", "round", "floor", "ceil", "trunc",
          "gelu_tanh", "softplus", "relu6", "hardtanh_backward", "sub_", "mul_", "add_", "div_")
_BINARY = ("add", "sub", "mul", "div", "where", "masked_fill", "masked_fill_", "maximum", "minimum", "eq",
           "ne", "le", "lt", "gt", "ge", "__and__", "__or__", "bitwise_and", "bitwise_or", "logical_and",
           "logical_or", "rsub", "floor_divide", "remainder", "fmod", "copy", "copy_", "addcmul", "lerp")
_FRESH = ("arange", "ones", "zeros", "full", "empty", "new_ones", "new_zeros", "new_empty", "new_full",
          "scalar_tensor", "rand", "randn", "tensor", "sym_size", "sym_numel", "_local_scalar_dense",
          "triu", "tril", "embedding_renorm_")
_NO_OUTPUT = ("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size",
              "_assert_async", "_set_grad_enabled")


def _arg(node: fx.Node, i: int) -> Any:
    """``node.args[i]``: torch.fx types every argument as the whole ``Argument`` union; each rule knows its
    op's schema (a tensor node, an int, a list of ints, ...)."""
    return node.args[i]


def _kwarg(node: fx.Node, name: str, default: Any) -> Any:
    """``node.kwargs.get(name, default)``, typed like :func:`_arg`."""
    return node.kwargs.get(name, default)


def _dims(a: Analysis, x: Any) -> Dims:
    """``a.d(x)`` for an operand the op's schema makes a tensor (as before, using it raises ``TypeError``
    if it is not one)."""
    return cast(Dims, a.d(x))



@rule(*_UNARY)
def _unary(a: Analysis, node: fx.Node) -> Any:
    out = a.fresh(node)
    x = a.d(_arg(node, 0)) if node.args else None
    if isinstance(out, list) and out and isinstance(out[0], int):
        broadcast(a, out, [x] + [a.d(v) for v in node.args[1:]])
    return out


@rule(*_BINARY)
def _binary(a: Analysis, node: fx.Node) -> Any:
    out = a.fresh(node)
    if op_is(node, "add", "sub", "rsub", "where", "masked_fill", "addcmul", "lerp", "maximum", "minimum"):
        a.addends.update(t for t in (a.tensor_of(v) for v in node.args) if t is not None)
    if isinstance(out, list) and (not out or isinstance(out[0], int)):
        broadcast(a, out, [a.d(v) for v in list(node.args) + list(node.kwargs.values())])
    return out


@rule(*_FRESH)
def _fresh(a: Analysis, node: fx.Node) -> Any:
    return a.fresh(node)


@rule(*_NO_OUTPUT)
def _none(a: Analysis, node: fx.Node) -> Any:
    return None


@rule("native_dropout")
def _native_dropout(a: Analysis, node: fx.Node) -> Any:
    x = _dims(a, _arg(node, 0))
    return [list(x), a.fresh(node)[1]]


@rule("getitem")
def _getitem(a: Analysis, node: fx.Node) -> Any:
    src = a.dims.get(_arg(node, 0).name) if isinstance(_arg(node, 0), fx.Node) else None
    idx = _arg(node, 1)
    if isinstance(src, list) and isinstance(idx, int) and idx < len(src) and not isinstance(src[idx], int):
        return src[idx]
    return a.fresh(node)


# -------------------------------------------------------------------------------------------- weights
@rule("linear")
def _linear(a: Analysis, node: fx.Node) -> Any:
    x, w = _dims(a, _arg(node, 0)), _dims(a, _arg(node, 1))
    b = a.d(_arg(node, 2)) if len(node.args) > 2 else None
    out = a.fresh(node)
    a.unite(x[-1], w[1])
    a.unite(out[-1], w[0])
    if b is not None:
        a.unite(out[-1], b[0])
    broadcast(a, out[:-1], [x[:-1]])
    name = a.tensor_of(_arg(node, 1))
    if name is not None and a.producers.get((name, 1)) == "embedding":
        a.flag_dims(w, [1], f"residual stream read by the LM head tied to the embedding {name}")
    a.producer(_arg(node, 1), 0, "linear")
    return out


@rule("addmm")
def _addmm(a: Analysis, node: fx.Node) -> Any:
    b, x, w = (_dims(a, v) for v in node.args[:3])
    out = a.fresh(node)
    a.unite(x[-1], w[0])
    a.unite(out[-1], w[1])
    a.unite(out[0], x[0])
    broadcast(a, out, [b])
    if a.tensor_of(_arg(node, 2)) is not None:
        a.producer(_arg(node, 2), 1, "linear")
    return out


@rule("mm", "bmm", "matmul")
def _matmul(a: Analysis, node: fx.Node) -> Any:
    x, y = _dims(a, _arg(node, 0)), _dims(a, _arg(node, 1))
    out = a.fresh(node)
    if len(x) == 1 or len(y) == 1:
        return out
    a.unite(x[-1], y[-2])
    a.unite(out[-2], x[-2])
    a.unite(out[-1], y[-1])
    broadcast(a, out[:-2], [x[:-2], y[:-2]])
    if a.tensor_of(_arg(node, 1)) is not None:
        a.producer(_arg(node, 1), -1, "linear")
    elif a.tensor_of(_arg(node, 0)) is None:
        a.read_dims(x, [-1], f"contracted with an activation by {_where(a, node)}")
        if len(out) >= 3 and a.spaces.size[a.spaces.find(out[-3])] > 1:
            a.attention[a.spaces.find(out[-3])] = (a.traced.module_of(node), _shape(_arg(node, 0).meta["val"])[-1])
    return out


@rule("conv1d", "conv2d", "conv3d", "convolution", "_convolution")
def _conv(a: Analysis, node: fx.Node) -> Any:
    x, w = _dims(a, _arg(node, 0)), _dims(a, _arg(node, 1))
    b = a.d(_arg(node, 2)) if len(node.args) > 2 else None
    groups = int(_arg(node, 8) if op_is(node, "convolution", "_convolution") else
                 (_arg(node, 6) if len(node.args) > 6 else _kwarg(node, "groups", 1)))
    out = a.fresh(node)
    a.unite(out[0], x[0])
    a.unite(out[1], w[0])
    if b is not None:
        a.unite(out[1], b[0])
    cin, cout = _shape(_arg(node, 0).meta["val"])[1], _shape(node.meta["val"])[1]
    if groups == 1:
        a.unite(x[1], w[1])
    elif groups == cin == cout:
        a.unite(x[1], out[1])           # depthwise: the channel passes through
    else:
        why = f"grouped convolution (groups={groups}) at {_where(a, node)}"
        a.flag_dims(x, [1], why)
        a.flag_dims(out, [1], why)
    a.producer(_arg(node, 1), 0, "conv")
    return out


def op_is(node: fx.Node, *names: str) -> bool:
    return op_name(node) in names


@rule("embedding")
def _embedding(a: Analysis, node: fx.Node) -> Any:
    w, idx = _dims(a, _arg(node, 0)), a.d(_arg(node, 1))
    out = a.fresh(node)
    a.unite(out[-1], w[1])
    broadcast(a, out[:-1], [idx])
    a.producer(_arg(node, 0), 1, "embedding")
    a.flag_dims(w, [1], f"embedding dimension of {a.tensor_of(_arg(node, 0))} (the residual stream starts here)")
    return out


# -------------------------------------------------------------------------------------------- norms
@rule("_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "batch_norm",
      "native_batch_norm", "_native_batch_norm_legit_functional", "instance_norm")
def _batch_norm(a: Analysis, node: fx.Node) -> Any:
    x = _dims(a, _arg(node, 0))
    out = a.fresh(node)
    main = out[0] if out and not isinstance(out[0], int) else out
    broadcast(a, main, [x])
    a.unite(main[0], x[0])
    a.unite(main[1], x[1])
    for v in node.args[1:5]:
        d = a.d(v)
        if d is not None and len(d) == 1:
            a.unite(d[0], x[1])
    if op_is(node, "instance_norm"):
        a.flag_dims(x, [1], f"normalised by {_where(a, node)}")
    return out


@rule("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def _layer_norm(a: Analysis, node: fx.Node) -> Any:
    x = _dims(a, _arg(node, 0))
    k = len(_arg(node, 1))
    out = a.fresh(node)
    main = out[0] if out and not isinstance(out[0], int) else out
    broadcast(a, main, [x])
    for v in node.args[2:4]:
        d = a.d(v)
        if d is not None:
            broadcast(a, x, [d])
    a.flag_dims(x, range(len(x) - k, len(x)), f"normalised over by {_where(a, node)}")
    return out


@rule("group_norm", "native_group_norm")
def _group_norm(a: Analysis, node: fx.Node) -> Any:
    x = _dims(a, _arg(node, 0))
    out = a.fresh(node)
    main = out[0] if out and not isinstance(out[0], int) else out
    broadcast(a, main, [x])
    for v in node.args[1:4]:
        d = a.d(v)
        if d is not None and len(d) == 1:
            a.unite(d[0], x[1])
    a.flag_dims(x, [1], f"normalised over by {_where(a, node)}")
    return out


def _dims_arg(node: fx.Node, pos: int, ndim: int) -> list[int]:
    v: Any = node.args[pos] if len(node.args) > pos else node.kwargs.get("dim")
    if v is None:
        return list(range(ndim))
    v = [v] if isinstance(v, int) else list(v)
    return [d % ndim for d in v] if v else list(range(ndim))


@rule("mean", "var", "std", "var_mean", "amax", "amin", "max", "min", "logsumexp", "norm", "sum", "argmax",
      "any", "all", "prod", "linalg_vector_norm")
def _reduce(a: Analysis, node: fx.Node) -> Any:
    x = _dims(a, _arg(node, 0))
    out = a.fresh(node)
    if x is None or not isinstance(out, list) or (out and not isinstance(out[0], int)):
        return out if x is None else _opaque_fallback(a, node)
    red = _dims_arg(node, 1 if not op_is(node, "linalg_vector_norm", "norm") else 2, len(x))
    if op_is(node, "sum"):   # a zero unit changes a mean/max/norm but not a sum: the sum *reads* the units
        a.read_dims(x, red, f"summed over by {_where(a, node)}")
    else:
        a.flag_dims(x, red, f"reduced over by {_where(a, node)}")
    kept = [d for i, d in enumerate(x) if i not in red]
    if len(out) == len(x):
        kept = [d if i not in red else out[i] for i, d in enumerate(x)]
    if len(kept) == len(out):
        broadcast(a, out, [kept])
    return out


def _opaque_fallback(a: Analysis, node: fx.Node) -> Any:
    return _opaque(a, node)


@rule("softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod", "diff", "sort", "topk")
def _along(a: Analysis, node: fx.Node) -> Any:
    x = _dims(a, _arg(node, 0))
    out = a.fresh(node)
    dim = _arg(node, 1) if len(node.args) > 1 and isinstance(_arg(node, 1), int) else _kwarg(node, "dim", -1)
    a.flag_dims(x, [dim], f"{_where(a, node)} along this dimension")
    main = out[0] if out and not isinstance(out[0], int) else out
    if main is not None and len(main) == len(x):
        keep = [i for i in range(len(x)) if i != dim % len(x)]
        for i in keep:
            a.unite(main[i], x[i])
    return out


# -------------------------------------------------------------------------------------------- pools
@rule("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
      "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d",
      "max_pool2d_with_indices", "_adaptive_avg_pool2d", "upsample_nearest2d", "upsample_bilinear2d",
      "pixel_shuffle", "pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d")
def _pool(a: Analysis, node: fx.Node) -> Any:
    x = _dims(a, _arg(node, 0))
    out = a.fresh(node)
    main = out[0] if out and not isinstance(out[0], int) else out
    if op_is(node, "pixel_shuffle"):
        return _opaque_fallback(a, node)
    n_spatial = {"1d": 1, "2d": 2, "3d": 3}.get(op_name_tail(node), 2)
    lead = len(x) - n_spatial
    for i in range(lead):
        a.unite(main[i], x[i])
    return out


def op_name_tail(node: fx.Node) -> str:
    name = op_name(node)
    for t in ("1d", "2d", "3d"):
        if name.endswith(t) or name.endswith(t + "_with_indices"):
            return t
    return "nd"


# -------------------------------------------------------------------------------------------- shapes
@rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_copy")
def _reshape(a: Analysis, node: fx.Node) -> Any:
    x = _dims(a, _arg(node, 0))
    return reshape_dims(a, x, _shape(_arg(node, 0).meta["val"]), _shape(node.meta["val"]))


@rule("permute", "permute_copy")
def _permute(a: Analysis, node: fx.Node) -> Any:
    x = _dims(a, _arg(node, 0))
    return [x[p % len(x)] for p in _arg(node, 1)]


@rule("transpose", "swapaxes", "t", "numpy_T")
def _transpose(a: Analysis, node: fx.Node) -> Any:
    x = list(_dims(a, _arg(node, 0)))
    if len(x) < 2:
        return x
    i, j = (_arg(node, 1), _arg(node, 2)) if len(node.args) > 2 else (0, 1)
    i, j = i % len(x), j % len(x)
    x[i], x[j] = x[j], x[i]
    return x


@rule("unsqueeze", "unsqueeze_copy")
def _unsqueeze(a: Analysis, node: fx.Node) -> Any:
    x = list(_dims(a, _arg(node, 0)))
    d = _arg(node, 1) % (len(x) + 1)
    return x[:d] + [a.spaces.new(1)] + x[d:]


@rule("squeeze", "squeeze_copy")
def _squeeze(a: Analysis, node: fx.Node) -> Any:
    x = _dims(a, _arg(node, 0))
    shape = _shape(_arg(node, 0).meta["val"])
    dims = _dims_arg(node, 1, len(x)) if len(node.args) > 1 else [i for i, s in enumerate(shape) if s == 1]
    return [d for i, d in enumerate(x) if not (i in dims and shape[i] == 1)]


@rule("expand", "expand_copy", "broadcast_to", "expand_as", "repeat")
def _expand(a: Analysis, node: fx.Node) -> Any:
    x = _dims(a, _arg(node, 0))
    out = a.fresh(node)
    if op_is(node, "repeat"):
        a.flag_dims(x, range(len(x)), f"tiled by {_where(a, node)}")
        return out
    broadcast(a, out, [x])
    return out


@rule("select", "select_copy")
def _select(a: Analysis, node: fx.Node) -> Any:
    x = _dims(a, _arg(node, 0))
    d = _arg(node, 1) % len(x)
    a.flag_dims(x, [d], f"indexed by {_where(a, node)}")
    return x[:d] + x[d + 1:]


@rule("slice", "slice_copy", "narrow")
def _slice(a: Analysis, node: fx.Node) -> Any:
    x = list(_dims(a, _arg(node, 0)))
    shape = _shape(_arg(node, 0).meta["val"])
    d = (_arg(node, 1) if len(node.args) > 1 else 0) % len(x)
    n = shape[d]
    if op_is(node, "narrow"):
        start, stop, step = _arg(node, 2), _arg(node, 2) + _arg(node, 3), 1
    else:
        start = _arg(node, 2) if len(node.args) > 2 and _arg(node, 2) is not None else 0
        stop = _arg(node, 3) if len(node.args) > 3 and _arg(node, 3) is not None else n
        step = _arg(node, 4) if len(node.args) > 4 else 1
    start, stop = _clip(start, n), _clip(stop, n)
    if step != 1 or not isinstance(start, int) or not isinstance(stop, int):
        a.flag_dims(x, [d], f"strided slice by {_where(a, node)}")
        return a.fresh(node)
    if stop - start == n:
        return x
    sizes = [s for s in (start, stop - start, n - stop) if s > 0]
    pieces = a.spaces.pieces(x[d], sizes)
    x[d] = pieces[1 if start > 0 else 0]
    return x


def _clip(v: Any, n: int) -> Any:
    if not isinstance(v, int):
        return v
    v = v + n if v < 0 else v
    return max(0, min(v, n))


@rule("split", "split_with_sizes", "chunk", "unbind", "tensor_split")
def _split(a: Analysis, node: fx.Node) -> Any:
    x = _dims(a, _arg(node, 0))
    outs = node.meta["val"]
    d = _arg(node, 2) if len(node.args) > 2 else _kwarg(node, "dim", 0)
    if op_is(node, "unbind"):
        d = _arg(node, 1) if len(node.args) > 1 else 0
        a.flag_dims(x, [d], f"unbound by {_where(a, node)}")
        return a.fresh(node)
    d = d % len(x)
    sizes = [_shape(o)[d] for o in outs]
    pieces = a.spaces.pieces(x[d], sizes)
    return [x[:d] + [p] + x[d + 1:] for p in pieces]


@rule("cat", "concat", "concatenate")
def _cat(a: Analysis, node: fx.Node) -> Any:
    parts = [a.d(t) for t in _arg(node, 0)]
    out = a.fresh(node)
    d = (_arg(node, 1) if len(node.args) > 1 else _kwarg(node, "dim", 0)) % len(out)
    same = [p for p in parts if p is not None and len(p) == len(out)]
    for p in same:
        for i in range(len(out)):
            if i != d:
                broadcast(a, [out[i]], [[p[i]]])
    if same:
        a.unite(out[d], a.spaces.concat([p[d] for p in same]))
    return out


@rule("stack")
def _stack(a: Analysis, node: fx.Node) -> Any:
    out = a.fresh(node)
    d = (_arg(node, 1) if len(node.args) > 1 else 0) % len(out)
    for t in _arg(node, 0):
        p = a.d(t)
        if p is not None:
            broadcast(a, out[:d] + out[d + 1:], [p])
    return out


# -------------------------------------------------------------------------------------------- attention
@rule("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
      "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention")
def _sdpa(a: Analysis, node: fx.Node) -> Any:
    q, k, v = (_dims(a, t) for t in node.args[:3])
    out = a.fresh(node)
    main = out[0] if out and not isinstance(out[0], int) else out
    a.unite(q[-1], k[-1])          # head_dim (q·k)
    a.unite(k[-2], v[-2])          # key positions
    a.unite(main[-1], v[-1])
    a.unite(main[-2], q[-2])
    broadcast(a, main[:-3], [q[:-3], k[:-3], v[:-3]])
    a.unite(main[-3], q[-3])
    a.unite(k[-3], v[-3])
    if len(node.args) > 3 and isinstance(_arg(node, 3), fx.Node):
        mask = a.d(_arg(node, 3))
        if mask is not None:
            broadcast(a, main[:-1] + [k[-2]], [mask])
    hq, hk = (a.spaces.size[a.spaces.find(t[-3])] for t in (q, k))
    module, head_dim = a.traced.module_of(node), _shape(_arg(node, 0).meta["val"])[-1]
    if hq == hk:
        a.unite(q[-3], k[-3])
        a.attention[a.spaces.find(q[-3])] = (module, head_dim)
    elif hq % hk == 0:             # enable_gqa: query heads = kv heads x n_rep (kv outer)
        kv, _rep = a.spaces.split(q[-3], [hk, hq // hk])
        a.unite(kv, k[-3])
        a.attention[a.spaces.find(q[-3])] = (module, head_dim)
    return out


def analyze(traced: Traced) -> Analysis:
    """Relate all dimensions of ``traced`` (see the module docstring)."""
    a = Analysis(traced)
    user = {n.name for n in traced.user_inputs}
    for node in traced.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            a.dims[node.name] = a.fresh(node)
            if node.name in user:
                a.flag_dims(a.d(node), range(len(a.d(node) or [])), f"model input {node.name}")
            name = traced.tensors.get(node.name)
            d = a.d(node)
            if name is not None and d is not None:
                a.tensor_dims[name] = d
        elif node.op == "call_function":
            fn = RULES.get(op_name(node), _opaque)
            a.dims[node.name] = fn(a, node)
        elif node.op == "output":
            _flag_outputs(a, node)
    return a
