"""Sparse backward: the decoder's linear layers compute gradients over the trained tokens' rows only.

A selective step trains a share of the tokens, yet the decoder's backward runs its matmuls over
every row. With ``SelectiveLM(model, sparse_backward=...)`` each linear layer of the chosen
decoder layers (attention projections, MLP, LoRA adapters) treats the output gradient of every
row that predicts no trained token as zero: its weight gradient and its input gradient are dense
matmuls over the gathered ``[k, H]`` block of kept rows (Collider, arXiv 2502.00340). The forward
is unchanged, so every token stays context for the others.

What it drops: the gradient that reaches parameters through unselected positions. In the exact
backward an unselected position still receives gradient as a key and value of later kept tokens,
and passes it down its residual stream to the layers below and to the embedding. Here that
gradient stops at the key and value projections of the chosen layers: below the lowest chosen
layer the residual stream of an unselected position receives none. Exact in the top layer are
the MLP, the attention output and the query projection (their output gradients at unselected
rows are zero anyway); every other projection's gradient is an approximation that
``python -m slm.analysis.fidelity`` measures. Layers below the chosen ones run their exact
backward on whatever gradient reaches them.

When nothing would be dropped (every labelled token trained, no ignored label inside a
sequence: the rows left out are sequence ends, which carry no gradient) the backward is the
exact one, bit for bit. :func:`mask_output_gradients` is the plain reference of the same rule
(hooks that zero the rows' output gradients), against which the tests compare this one.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slm.model.architectures import causal_lm, no_split_layers, whole_numel

# Linear layers whose forward is ``x @ W.T + b`` (nn.Linear's math) under another class name.
_LINEAR_EQUIVALENTS = {"FalconLinear", "NonDynamicallyQuantizableLinear"}
# transformers' Conv1D (GPT-2 family): ``x @ W + b`` with W stored [in, out].
_TRANSPOSED = {"Conv1D"}


@dataclass
class KeptRows:
    """The rows one forward trains, filled in once selection has run (before any backward).

    ``n_rows`` is how many rows every linear input of the decoder has (``B x T``); ``index``
    the kept rows (device, int64); ``dense`` says nothing is dropped (run the exact backward)."""

    n_rows: int
    index: Tensor | None = None
    dense: bool = False
    _source: tuple | None = None  # the last input gathered: q/k/v (and gate/up) share one gather
    _gathered: Tensor | None = None

    def keep(self, positions: Tensor, seq_len: int) -> None:
        """Keep the rows that predict ``positions`` (flat indices into ``labels[:, 1:]``, ``B x (T-1)``)."""
        per_row = seq_len - 1
        self.index = positions + torch.div(positions, per_row, rounding_mode="floor")
        # The rows never kept are then the sequences' last positions: nothing attends to them, no
        # loss reads them, their gradient is zero in the exact backward too.
        self.dense = positions.numel() == (self.n_rows // seq_len) * per_row

    def gather(self, x2d: Tensor) -> Tensor:
        """``x2d[index]``, computed once for all the projections that read the same input."""
        key = (x2d.data_ptr(), x2d.shape, x2d.stride(), x2d.dtype)
        if self._source is None or self._source[0] != key:
            if self._source is None:  # the first gather of this backward: let go of the last at its end
                torch.autograd.Variable._execution_engine.queue_callback(self._release)
            self._source = (key, x2d)  # holding x2d keeps its address from being reused meanwhile
            self._gathered = x2d.index_select(0, self.index)
        return self._gathered

    def _release(self) -> None:
        """Drop the cached input and gather (an activation's worth of memory) once the backward is done."""
        self._source = self._gathered = None


def _rows_error(module_name: str, got: int, expected: int) -> RuntimeError:
    return RuntimeError(
        f"sparse_backward: a linear layer saw {got} rows in its backward where the step's forward had "
        f"{expected} ({module_name}). The backward must follow the forward it belongs to (forward, backward, "
        "then the next forward), and the decoder's layers must map tokens to rows one to one"
    )


class _RowSparseLinear(torch.autograd.Function):
    """``y = x @ W.T + b`` (``x @ W + b`` when ``transposed``) whose backward covers the kept rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows: KeptRows, transposed: bool, name: str):
        ctx.rows, ctx.transposed, ctx.name = rows, transposed, name
        device = x.device.type
        ctx.cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.save_for_backward(x, weight, bias)
        w = weight.t() if transposed else weight
        return nn.functional.linear(x, w, bias)  # autocast applies here as to any linear

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        rows: KeptRows = ctx.rows
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x2d = x.reshape(-1, x.shape[-1])
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if g.shape[0] != rows.n_rows:
            raise _rows_error(ctx.name, g.shape[0], rows.n_rows)
        # W as the forward's matmul used it: [out, in], in the autocast dtype when there was one.
        w = weight.t() if ctx.transposed else weight
        if ctx.cast is not None:
            w, x2d, g = w.to(ctx.cast), x2d.to(ctx.cast), g.to(ctx.cast)
        gx = gw = gb = None
        if rows.dense:  # the same matmuls as autograd's linear backward, so the result is bit for bit
            if need_x:
                gx = g.mm(w)
            if need_w:
                gw = x2d.t().mm(g) if ctx.transposed else g.t().mm(x2d)
            if need_b:
                gb = g.sum(0)
        else:
            gk = g.index_select(0, rows.index)
            if need_x:
                gx = g.new_zeros(x2d.shape).index_copy_(0, rows.index, gk.mm(w))
            if need_w:
                xk = rows.gather(x2d)
                gw = xk.t().mm(gk) if ctx.transposed else gk.t().mm(xk)
            if need_b:
                gb = gk.sum(0)
        if gx is not None:
            gx = gx.to(x.dtype).reshape(x.shape)
        if gw is not None:
            gw = gw.to(weight.dtype)
        if gb is not None:
            gb = gb.to(bias.dtype)
        return gx, gw, gb, None, None, None


class _Recorder:
    """Which :class:`KeptRows` the patched linears of one model record into.

    ``active`` while SelectiveLM's forward runs the decoder; ``recompute`` the last forward's,
    for activation checkpointing, which re-runs a layer's forward inside the backward."""

    def __init__(self):
        self.active: KeptRows | None = None
        self.recompute: KeptRows | None = None

    def current(self) -> KeptRows | None:
        if self.active is not None:
            return self.active
        if self.recompute is not None and torch._C._current_graph_task_id() != -1:  # inside a backward
            return self.recompute
        return None


class _SparseLinearMixin:
    """Mixed into a linear layer's class (as FSDP2 swaps classes): its forward records kept rows."""

    _slm_recorder: _Recorder
    _slm_name: str

    def forward(self, x):
        rows = self._slm_recorder.current()
        if rows is None or not torch.is_grad_enabled():
            return super().forward(x)
        return _RowSparseLinear.apply(x, self.weight, self.bias, rows, self._slm_transposed, self._slm_name)


_SWAPPED: dict[type, type] = {}


def _sparse_class(cls: type, transposed: bool) -> type:
    if cls not in _SWAPPED:
        name = f"SparseBackward{cls.__name__}"
        _SWAPPED[cls] = type(name, (_SparseLinearMixin, cls), {"_slm_transposed": transposed})
    return _SWAPPED[cls]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The text decoder's layers, bottom to top (the model's ``_no_split_modules`` under its decoder)."""
    lm = causal_lm(model)
    layers = no_split_layers(lm.get_decoder() if hasattr(lm, "get_decoder") else lm.base_model, lm)
    if not layers:
        raise ValueError(
            f"sparse_backward: found no decoder layer in {type(lm).__name__} (it names no _no_split_modules); "
            "use sparse_backward=False"
        )
    return layers


_MOE_MARKERS = ("moe", "expert", "router")


def _refuse_moe(layer: nn.Module, arch: str) -> None:
    for name, module in layer.named_modules():
        kind = type(module).__name__.lower()
        if any(m in kind for m in _MOE_MARKERS) or any(p.dim() > 2 for p in module.parameters(recurse=False)):
            raise ValueError(
                f"sparse_backward does not support mixtures of experts ({arch}: {type(module).__name__} at "
                f"{name or 'the layer'}): each expert multiplies its own routed share of the tokens, so the kept "
                "rows would have to be found again inside every expert. Use sparse_backward=False for this model"
            )


def _linear_kind(module: nn.Module) -> bool | None:
    """True: ``x @ W``; False: ``x @ W.T``; None: not a linear layer."""
    names = {c.__name__ for c in type(module).__mro__}
    if names & _TRANSPOSED:
        return True
    if isinstance(module, nn.Linear):
        # the class whose forward runs, looking past the recording class this module may wear already
        base = next(c for c in type(module).__mro__ if c is not _SparseLinearMixin and "forward" in vars(c))
        if base is nn.Linear or base.__name__ in _LINEAR_EQUIVALENTS:
            return False
        raise ValueError(
            f"sparse_backward: {type(module).__name__} is a linear layer with its own forward (quantised or "
            "otherwise changed); the mode handles nn.Linear, transformers' Conv1D and FalconLinear. Use "
            "sparse_backward=False for this model"
        )
    return None


class SparseBackward:
    """Installs the mode on the top ``depth`` decoder layers of a model (``None``: all of them)."""

    def __init__(self, model: nn.Module, depth: int | None):
        self.model = model
        self.depth = depth
        self.recorder = _Recorder()
        self.layers = self._chosen()
        self.install()  # an unsupported layer is an error now, not at the first step

    def _chosen(self) -> list[nn.Module]:
        layers = decoder_layers(self.model)
        if self.depth is not None:
            if not 1 <= self.depth <= len(layers):
                raise ValueError(
                    f"sparse_backward={self.depth}: the model has {len(layers)} decoder layers; give 1.."
                    f"{len(layers)} (the top N layers), True (all) or False"
                )
            layers = layers[-self.depth :]
        arch = causal_lm(self.model).config.model_type
        for layer in layers:
            _refuse_moe(layer, arch)
        return layers

    def install(self) -> int:
        """Swap every linear layer of the chosen layers to its recording class (also ones added since,
        e.g. LoRA adapters); returns how many there are."""
        n = 0
        for i, layer in enumerate(self.layers):
            for name, module in layer.named_modules():
                if not isinstance(module, _SparseLinearMixin):  # swapped already: known to be a linear layer
                    transposed = _linear_kind(module)
                    if transposed is None:
                        continue
                    module.__class__ = _sparse_class(type(module), transposed)
                module._slm_recorder = self.recorder
                module._slm_name = f"layer {i - len(self.layers)} {name}"
                n += 1
        return n

    def weights(self) -> int:
        """How many parameters the recording layers hold (their backward covers the kept rows)."""
        return sum(
            whole_numel(p)
            for layer in self.layers
            for m in layer.modules()
            if isinstance(m, _SparseLinearMixin)
            for p in m.parameters(recurse=False)
        )

    @contextmanager
    def recording(self, rows: KeptRows):
        """Run the decoder's forward inside this: its linear layers record ``rows`` for their backward."""
        self.install()
        self.recorder.active = rows
        try:
            yield rows
        finally:
            self.recorder.active = None
            self.recorder.recompute = rows


def check_sparse_backward(value) -> int | None | bool:
    """``False`` (off), ``True`` (every decoder layer) or an int N >= 1 (the top N): returns False, None or N."""
    if value is False or value is None:
        return False
    if value is True:
        return None
    if isinstance(value, int) and value >= 1:
        return value
    raise ValueError(
        f"sparse_backward must be False (exact backward), True (every decoder layer) or an int N >= 1 (the top N "
        f"decoder layers), got {value!r}"
    )


@contextmanager
def mask_output_gradients(layers: list[nn.Module], keep_rows: Tensor):
    """The plain reference of the rule: zero the output gradient of every unkept row of every linear
    layer in ``layers`` (a backward hook per layer; full dense matmuls). ``keep_rows`` is a bool
    ``[B * T]`` mask."""
    handles = []

    def hook(module, inputs, output):
        if output.requires_grad:
            shape = output.shape
            output.register_hook(lambda g: (g.reshape(-1, shape[-1]) * keep_rows[:, None].to(g.dtype)).reshape(shape))

    for layer in layers:
        for module in layer.modules():
            if _linear_kind(module) is not None:
                handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
