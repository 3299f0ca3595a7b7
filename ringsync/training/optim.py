"""SGD, and the DistributedOptimizer that makes it data-parallel (Horovod's name and role).

Synchronous data-parallel SGD in one sentence: every rank computes gradients on its own shard
of the batch, the gradients are averaged across ranks, and every rank applies the same update
to the same parameters -- so the model stays identical everywhere, bit for bit.
DistributedOptimizer is the "averaged across ranks" part: it wraps any local optimizer and
runs one fused ring all-reduce over the gradients before each step.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .. import ops
from ..collectives import broadcast_
from ..fusion import grouped_allreduce_
from .nn import Params


class SGD:
    """Stochastic gradient descent with momentum and weight decay, over a Params store.

        g = grad + weight_decay * w;   v = momentum * v + g;   w -= lr * v

    (PyTorch's formulation.) The update runs on the flat buffers: one pass for the whole model.
    """

    def __init__(self, params: Params, lr: float = 0.1, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        if not isinstance(params, Params):
            raise TypeError(f"params must be a ringsync.nn.Params, got {type(params).__name__}")
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not (isinstance(value, (int, float)) and value >= 0 and np.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.params, self.lr, self.momentum, self.weight_decay = params, lr, momentum, weight_decay
        self.velocity = params.data.copy()
        self.velocity[...] = 0

    def step(self) -> None:
        """Apply one update from the current gradients."""
        w, g = self.params.data, self.params.flat_grad
        if self.weight_decay:
            g = g + self.weight_decay * w
        if self.momentum:
            self.velocity *= self.momentum
            self.velocity += g
            g = self.velocity
        w -= self.lr * g

    def state_dict(self) -> dict[str, np.ndarray]:
        """Momentum buffers by parameter name (views of the flat velocity)."""
        out, offset = {}, 0
        for name in self.params.names:
            n = self.params.value[name].size
            out[name] = self.velocity[offset:offset + n].reshape(self.params.value[name].shape)
            offset += n
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore momentum buffers saved by state_dict()."""
        views = self.state_dict()
        for name, view in views.items():
            if name not in state or tuple(state[name].shape) != view.shape:
                raise ValueError(f"optimizer state for {name!r} is missing or has the wrong shape")
            view[...] = state[name]


class DistributedOptimizer:
    """Wrap a local optimizer so each step uses gradients averaged over all ranks.

    step() = synchronize() (one fused ring all-reduce of every gradient, op Average) followed
    by the wrapped optimizer's step(). Call synchronize() yourself to time the two apart; step()
    then does not reduce again. Gradients are views into one flat buffer, so fusion copies nothing.
    """

    def __init__(self, optimizer: SGD, op: str = ops.Average, fusion_bytes: int | None = None) -> None:
        if not hasattr(optimizer, "step") or not hasattr(optimizer, "params"):
            raise TypeError(f"optimizer must have .step() and .params, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.op = ops.resolve_op(op)
        self.fusion_bytes = fusion_bytes
        self._synchronized = False

    @property
    def params(self) -> Params:
        return self.optimizer.params

    def synchronize(self) -> None:
        """All-reduce (average) the gradients across ranks, in place."""
        grouped_allreduce_(self.params.grads(), op=self.op, fusion_bytes=self.fusion_bytes)
        self._synchronized = True

    def step(self) -> None:
        """Average the gradients (unless synchronize() already did), then update."""
        if not self._synchronized:
            self.synchronize()
        self.optimizer.step()
        self._synchronized = False

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.optimizer.load_state_dict(state)


def broadcast_parameters(params: Params | Mapping[str, np.ndarray] | Sequence[np.ndarray],
                         root: int = 0) -> None:
    """Overwrite every rank's parameters with root's, in place (so all ranks start equal).

    Accepts a Params store (one broadcast of its flat buffer), a dict of arrays (in sorted
    name order, so all ranks agree) or a list of arrays.
    """
    if isinstance(params, Params):
        broadcast_(params.data, root=root)
        return
    if isinstance(params, Mapping):
        arrays = [params[k] for k in sorted(params)]
    elif isinstance(params, (list, tuple)):
        arrays = list(params)
    else:
        raise TypeError(f"params must be Params, a dict or a list of arrays, got {type(params).__name__}")
    # One broadcast per array: how the arrays happen to lie in memory may differ between
    # ranks, so it must not decide how many calls each rank makes.
    for a in arrays:
        broadcast_(a, root=root)
