"""A tiny neural network, forward and backward written out: Linear, ReLU, softmax cross-entropy.

Everything is computed with an array module `xp`: NumPy on the CPU, CuPy on a GPU, through the
same lines. Every parameter and every gradient is a view into one flat buffer (a FlatBuffer),
so the whole model's gradient is one contiguous array: DistributedOptimizer all-reduces it
in one fused ring call with no packing copy.

Shapes: a batch x is (n, features); a Linear layer holds W (in, out) and b (out,), y = x W + b.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from ..fusion import FlatBuffer, FlatViews


class Params:
    """Named parameters and their gradients, stored as views into two flat buffers."""

    def __init__(self, specs: Sequence[tuple[str, tuple[int, ...]]], dtype: object = np.float32,
                 xp=np, shared_grads: bool = False) -> None:
        self.names = [name for name, _ in specs]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"parameter names must be unique, got {self.names}")
        shapes = [shape for _, shape in specs]
        self._values = FlatBuffer(shapes, dtype, xp)
        # shared_grads: the gradients in the node's shared memory, where the all-reduce reads
        # the other ranks' in place (FlatBuffer(shared=True); collective: every rank at once)
        self._grads = FlatBuffer(shapes, dtype, xp, shared=shared_grads)
        self.value = dict(zip(self.names, self._values.views))
        self.grad = dict(zip(self.names, self._grads.views))
        self.index = {name: i for i, name in enumerate(self.names)}
        self.offsets = self._grads.offsets      # parameter i is flat[offsets[i]:offsets[i + 1]]
        self._grad_hooks: list[Callable[[list[str]], None]] = []
        self.announces_grads = False    # whether anyone listens: a model may skip the calls otherwise
        self._units: dict[int, tuple[int, ...]] = {}    # first index -> parameters written together

    def group(self, names: Sequence[str]) -> None:
        """Declare that backward writes (and announces) these consecutive parameters together,
        as a layer's weight and bias: overlap's buckets never split them. Parameters that are
        not consecutive, or already in another group, stay alone (a bucket may split them)."""
        unit = tuple(sorted(self.index[n] for n in names))
        if self._units.get(unit[0]) == unit:
            return                      # (the same layer built twice over one Params)
        if list(unit) != list(range(unit[0], unit[0] + len(unit))) or any(
                i in u for u in self._units.values() for i in unit):
            return                      # not consecutive, or overlapping: each parameter alone
        self._units[unit[0]] = unit

    def units(self) -> list[tuple[int, ...]]:
        """Every parameter index in a unit, in memory order: the declared groups, the rest alone."""
        out, i = [], 0
        while i < len(self.names):
            unit = self._units.get(i, (i,))
            out.append(unit)
            i += len(unit)
        return out

    # Gradient hooks: a model's backward announces each layer's gradients the moment they are
    # written (grads_ready), last layer first; DistributedOptimizer(overlap=True) listens, and
    # starts a bucket's all-reduce as soon as its last gradient is in (training/overlap.py).

    def add_grad_hook(self, fn: Callable[[list[str]], None]) -> None:
        """Call fn(names) whenever backward has written the gradients of `names`."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self._grad_hooks.append(fn)
        self.announces_grads = True

    def remove_grad_hook(self, fn: Callable[[list[str]], None]) -> None:
        while fn in self._grad_hooks:
            self._grad_hooks.remove(fn)
        self.announces_grads = bool(self._grad_hooks)

    def backward_starts(self) -> None:
        """A backward pass is about to write gradients: the hooks may refuse it (raise) while
        the gradients are still untouched."""
        for fn in self._grad_hooks:
            check = getattr(fn, "before_backward", None)
            if check is not None:
                check()

    def grads_ready(self, names: list[str]) -> None:
        """Backward has just written the gradients of `names`: tell the hooks."""
        for fn in self._grad_hooks:
            fn(names)

    @property
    def data(self):
        """All parameters as one flat array (views in `value` share its memory)."""
        return self._values.flat

    @property
    def flat_grad(self):
        """All gradients as one flat array (views in `grad` share its memory)."""
        return self._grads.flat

    def close(self) -> None:
        """Free shared gradient memory (collective); the views must not be used afterwards."""
        self._grads.close()

    def grads(self) -> FlatViews:
        """The gradient views, in order: back to back in memory (fusion reduces them with no copy)."""
        return self._grads.views

    def values(self) -> FlatViews:
        """The parameter views, in order: back to back in memory."""
        return self._values.views


class Linear:
    """y = x W + b, with W and b views into the model's Params."""

    def __init__(self, params: Params, name: str, xp=np) -> None:
        self.params, self.names = params, [f"{name}.weight", f"{name}.bias"]
        params.group(self.names)          # written together by backward: one bucket (overlap.py)
        self.W, self.b = params.value[f"{name}.weight"], params.value[f"{name}.bias"]
        self.dW, self.db = params.grad[f"{name}.weight"], params.grad[f"{name}.bias"]
        self.xp = xp
        self.x = None

    def forward(self, x):
        self.x = x                        # kept for the backward pass
        return x @ self.W + self.b

    def backward(self, dy, input_grad: bool = True):
        """Given dL/dy, write dL/dW and dL/db into the gradient buffer and return dL/dx.

        The first layer's dL/dx (a gradient for the data) is never needed: input_grad=False skips it.
        """
        self.dW[...] = self.x.T @ dy
        self.db[...] = dy.sum(axis=0)
        if self.params.announces_grads:     # dW, db are final: their all-reduce may start now
            self.params.grads_ready(self.names)
        return dy @ self.W.T if input_grad else None


class ReLU:
    """max(x, 0); its gradient passes where the input was positive."""

    def __init__(self, xp=np) -> None:
        self.xp = xp
        self.mask = None

    def forward(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dy):
        return dy * self.mask


def softmax_cross_entropy(logits, labels, xp=np):
    """Mean cross-entropy of integer `labels` under softmax(`logits`), and its gradient.

    Returns (loss, dlogits). Subtracting each row's max first keeps exp() from overflowing;
    the gradient is the classic (softmax - one_hot) / n.
    """
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_norm
    rows = xp.arange(n)
    loss = -log_probs[rows, labels].mean()
    dlogits = xp.exp(log_probs)
    dlogits[rows, labels] -= 1
    dlogits /= n
    return loss, dlogits


class MLP:
    """Linear -> ReLU -> ... -> Linear: a multilayer perceptron of the given widths.

    sizes = [inputs, hidden..., classes]. Weights start He-initialised from `seed` (drawn with
    NumPy on the host, then copied into `xp` arrays), biases at zero.
    """

    def __init__(self, sizes: Sequence[int], seed: int = 0, dtype: object = np.float32, xp=np,
                 shared_grads: bool = False) -> None:
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must be at least [inputs, classes], all >= 1, got {sizes}")
        self.sizes, self.xp = sizes, xp
        specs = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            specs += [(f"fc{i}.weight", (n_in, n_out)), (f"fc{i}.bias", (n_out,))]
        self.params = Params(specs, dtype, xp, shared_grads=shared_grads)
        rng = np.random.default_rng(seed)
        self.layers: list = []
        for i, n_in in enumerate(sizes[:-1]):
            w = self.params.value[f"fc{i}.weight"]
            w[...] = xp.asarray(rng.standard_normal(w.shape) * np.sqrt(2.0 / n_in))
            if i:
                self.layers.append(ReLU(xp))
            self.layers.append(Linear(self.params, f"fc{i}", xp))

    def forward(self, x):
        """Logits for the batch x (n, inputs)."""
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dlogits) -> None:
        """Fill params.grad from dL/dlogits (after a forward on the same batch)."""
        if self.params.announces_grads:
            self.params.backward_starts()
        for layer in reversed(self.layers[1:]):
            dlogits = layer.backward(dlogits)
        self.layers[0].backward(dlogits, input_grad=False)

    def loss_and_grad(self, x, labels) -> tuple[float, float]:
        """Forward and backward on one batch: fills the gradients, returns (loss, accuracy)."""
        logits = self.forward(x)
        loss, dlogits = softmax_cross_entropy(logits, labels, self.xp)
        self.backward(dlogits)
        accuracy = (logits.argmax(axis=1) == labels).mean()
        return float(loss), float(accuracy)

    def evaluate(self, x, labels, batch: int = 4096) -> tuple[float, float]:
        """(mean loss, accuracy) over a whole data set, without touching the gradients."""
        total_loss, correct, n = 0.0, 0, x.shape[0]
        for start in range(0, n, batch):
            xb, yb = x[start:start + batch], labels[start:start + batch]
            logits = self.forward(xb)
            loss, _ = softmax_cross_entropy(logits, yb, self.xp)
            total_loss += float(loss) * xb.shape[0]
            correct += int((logits.argmax(axis=1) == yb).sum())
        return total_loss / max(n, 1), correct / max(n, 1)
