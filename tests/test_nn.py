"""The MLP's hand-written backward pass against finite differences; SGD's update rule."""
import numpy as np
import pytest

from ringsync.fusion import contiguous_span
from ringsync.training.nn import MLP, Params, softmax_cross_entropy
from ringsync.training.optim import SGD


def batch(n=6, features=5, classes=4, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, features)), rng.integers(0, classes, n)


def loss_only(model, x, y):
    loss, _ = softmax_cross_entropy(model.forward(x), y)
    return float(loss)


@pytest.mark.parametrize("sizes", [[5, 4], [5, 7, 4], [5, 8, 6, 4]])
def test_gradients_match_finite_differences(sizes):
    x, y = batch(features=sizes[0], classes=sizes[-1])
    model = MLP(sizes, seed=3, dtype=np.float64)
    for name in model.params.names:          # biases start at 0: move them so ReLUs vary
        model.params.value[name][...] += 0.1 * np.random.default_rng(9).standard_normal(
            model.params.value[name].shape)
    model.loss_and_grad(x, y)
    analytic = model.params.flat_grad.copy()
    numeric = np.zeros_like(analytic)
    w, h = model.params.data, 1e-6
    for i in range(w.size):
        keep = w[i]
        w[i] = keep + h
        up = loss_only(model, x, y)
        w[i] = keep - h
        down = loss_only(model, x, y)
        w[i] = keep
        numeric[i] = (up - down) / (2 * h)
    assert np.allclose(analytic, numeric, rtol=1e-5, atol=1e-7), np.abs(analytic - numeric).max()


def test_softmax_cross_entropy_is_stable_and_correct():
    logits = np.array([[1000.0, 0.0], [0.0, 0.0]])
    loss, grad = softmax_cross_entropy(logits, np.array([0, 1]))
    assert np.isfinite(loss) and abs(loss - np.log(2) / 2) < 1e-12
    assert np.allclose(grad, [[0, 0], [0.25, -0.25]])


def test_parameters_and_gradients_are_views_of_one_flat_buffer():
    model = MLP([5, 7, 4], seed=0)
    p = model.params
    assert p.data.size == 5 * 7 + 7 + 7 * 4 + 4
    assert contiguous_span(p.grads()) is not None and contiguous_span(p.values()) is not None
    p.flat_grad[...] = 1
    assert all((g == 1).all() for g in p.grads())


def test_same_seed_same_model_and_accuracy_on_learnable_data():
    a, b = MLP([5, 8, 3], seed=4), MLP([5, 8, 3], seed=4)
    assert np.array_equal(a.params.data, b.params.data)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    opt = SGD(a.params, lr=0.2, momentum=0.9)
    for _ in range(200):
        a.loss_and_grad(x, y)
        opt.step()
    loss, acc = a.evaluate(x, y)
    assert acc > 0.9 and loss < 0.3


def test_sgd_update_rule_with_momentum_and_weight_decay():
    p = Params([("w", (3,))], np.float64)
    p.value["w"][...] = [1.0, 2.0, 3.0]
    opt = SGD(p, lr=0.5, momentum=0.9, weight_decay=0.1)
    v = np.zeros(3)
    w = np.array([1.0, 2.0, 3.0])
    for g in ([1.0, 0.0, -1.0], [0.5, 0.5, 0.5]):
        p.grad["w"][...] = g
        opt.step()
        v = 0.9 * v + (np.array(g) + 0.1 * w)
        w = w - 0.5 * v
        assert np.allclose(p.value["w"], w)
    state = opt.state_dict()
    assert np.allclose(state["w"], v)
    fresh = SGD(p, lr=0.5, momentum=0.9)
    fresh.load_state_dict(state)
    assert np.array_equal(fresh.velocity, opt.velocity)


def test_bad_arguments():
    with pytest.raises(ValueError, match="lr"):
        SGD(MLP([2, 2]).params, lr=-1)
    with pytest.raises(TypeError, match="params"):
        SGD([np.zeros(3)])
    with pytest.raises(ValueError, match="sizes"):
        MLP([3])
    with pytest.raises(ValueError, match="unique"):
        Params([("a", (1,)), ("a", (2,))])

