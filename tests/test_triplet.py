"""Triplet and angular-triplet losses with in-graph mining against loop-based numpy references."""
import mxnet as mx
import numpy as np
import pytest

from recognition.heads import build_train_symbol, make_loss_config


# ---------------------------------------------------------------- numpy reference (explicit loops)
def ref_dist(x, kind):
    n = x / np.linalg.norm(x, axis=1, keepdims=True)
    if kind == "atriplet":
        return np.arccos(np.clip(n @ n.T, -1.0, 1.0))
    return ((n[:, None, :] - n[None, :, :]) ** 2).sum(-1)


def ref_triplet(x, label, kind, mining, alpha):
    """(mean loss, number of triplets used)."""
    d = ref_dist(x, kind)
    b = len(label)
    terms = []
    for a in range(b):
        positives = [p for p in range(b) if p != a and label[p] == label[a]]
        negatives = [n for n in range(b) if label[n] != label[a]]
        if mining == "hard":
            if positives and negatives:
                terms.append(max(0.0, max(d[a, p] for p in positives) - min(d[a, n] for n in negatives) + alpha))
            continue
        for p in positives:
            semi = [d[a, n] for n in negatives if d[a, p] < d[a, n] < d[a, p] + alpha]
            if semi:
                terms.append(d[a, p] - min(semi) + alpha)
    return (float(np.mean(terms)) if terms else 0.0), len(terms)


def run_loss(x, label, cfg):
    sym, info = build_train_symbol(mx.sym.Variable("emb"), 0, cfg)
    ex = sym.bind(mx.cpu(), args={"emb": mx.nd.array(x), "softmax_label": mx.nd.array(label)},
                  args_grad={"emb": mx.nd.zeros(x.shape)}, grad_req={"emb": "write", "softmax_label": "null"})
    ex.forward(is_train=True)
    ex.backward()
    return ex.outputs[0].asnumpy(), ex.grad_dict["emb"].asnumpy(), ex.outputs[1].asnumpy(), info


def fd_grad(x, f, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        old = x[idx]
        x[idx] = old + eps
        hi = f()
        x[idx] = old - eps
        lo = f()
        x[idx] = old
        g[idx] = (hi - lo) / (2 * eps)
    return g


@pytest.mark.parametrize("kind", ["triplet", "atriplet"])
@pytest.mark.parametrize("mining", ["hard", "semihard"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_triplet_value_and_gradient_match_numpy(kind, mining, shuffle):
    rng = np.random.default_rng(10)
    k, ids, e = 4, 3, 6
    label = np.repeat(np.arange(ids), k).astype(float)
    x = rng.standard_normal((ids * k, e)) + 1.5 * rng.standard_normal((ids, e))[label.astype(int)]
    if shuffle:  # mining reads identities from labels, not from the batch order
        perm = rng.permutation(len(label))
        x, label = x[perm], label[perm]
    alpha = 0.3 if kind == "triplet" else 0.25
    cfg = make_loss_config(kind, triplet_mining=mining, triplet_alpha=alpha, images_per_identity=k)
    loss, grad, emb_out, info = run_loss(x, label, cfg)
    ref, count = ref_triplet(x, label, kind, mining, alpha)
    assert count > 0 and ref > 0, "the seeded batch must contain active triplets"
    np.testing.assert_allclose(loss, [ref], rtol=1e-4, atol=1e-6)
    g = fd_grad(x, lambda: ref_triplet(x, label, kind, mining, alpha)[0])
    np.testing.assert_allclose(grad, g, rtol=2e-3, atol=2e-5)
    np.testing.assert_allclose(emb_out, x, rtol=1e-6)
    assert info == dict(fc7_params=[], metric="loss", outputs=["triplet_loss_output", "emb_emb_output"],
                        aux_params=[])


@pytest.mark.parametrize("kind", ["triplet", "atriplet"])
@pytest.mark.parametrize("mining", ["hard", "semihard"])
def test_separated_identities_give_zero_loss_and_finite_gradient(kind, mining):
    label = np.repeat(np.arange(3), 2).astype(float)
    x = np.eye(4)[label.astype(int)] * 2.0  # each identity on its own axis: d_ap = 0, d_an = 2 (or pi/2)
    loss, grad, _, _ = run_loss(x, label, make_loss_config(kind, triplet_mining=mining, images_per_identity=2))
    assert loss[0] == 0.0
    assert np.all(np.isfinite(grad)) and np.all(grad == 0)


def test_single_identity_batch_has_no_triplets():
    x = np.random.default_rng(5).standard_normal((4, 3))
    label = np.zeros(4)
    for mining in ("hard", "semihard"):
        loss, grad, _, _ = run_loss(x, label, make_loss_config("triplet", triplet_mining=mining,
                                                                images_per_identity=4))
        assert loss[0] == 0.0 and np.all(grad == 0)
