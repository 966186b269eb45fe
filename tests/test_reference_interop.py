"""Interop with the reference PyTorch manifold checkpoint: parity of distances and gradients, round trips,
and clear errors on malformed checkpoints."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

# third_party/ is not an installed package; make the repo root importable however pytest is launched.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shelllcc.rewards import manifold_distance
from third_party.shell_lcc_reference import load_manifold, save_manifold
from third_party.shell_lcc_torch import ReferenceManifold

D, K, H = 16, 64, 32
KINDS = ("shell_norm", "lcc", "shell", "shell_band")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    m = ReferenceManifold(D, K, H).double()
    with torch.no_grad():
        m.basis.normal_(0.0, 1.0)
        m.global_scale.fill_(1.3)
        m.global_bias.normal_(0.0, 0.2)
        bn = m.predictor[1]
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.1)
        bn.running_mean.normal_(0.0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(123)
        # Peaked coding weights and log-variances of order 1, so each layer visibly matters.
        m.predictor[5].weight.mul_(10.0)
        m.surface_head[2].weight.mul_(3.0)
    return m.eval()


@pytest.fixture(scope="module")
def latents():
    # float32 values fed to both sides, so the comparison measures arithmetic, not input rounding.
    x = np.random.default_rng(1).normal(size=(2, D, 3, 4, 5)).astype(np.float32)  # [B, C, T, H, W]
    return x


def channels_last(x):
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 4, 1)))


def write_ckpt(path, state, config=None, **extra):
    torch.save({"model": dict(state), "config": config or {"embedding_dim": D, "num_bases": K, "hidden_dim": H},
                **extra}, path)
    return path


def torch_value_and_grad(m, x, kind, tau=None):
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    value = m.distance(xt, kind, tau)
    (g,) = torch.autograd.grad(value, xt)
    return value.item(), channels_last(g.numpy())


@pytest.fixture(scope="module")
def tau(ref, latents):
    # A band target away from the current mean, so |mean - tau| is smooth around these latents.
    with torch.no_grad():
        return 0.8 * ref.shell_norm(torch.tensor(latents, dtype=torch.float64)).item()


@functools.partial(jax.jit, static_argnames=("tau",))
def jax_values_and_grads(params, z, tau):
    """``{(kind, chunk_size): (distance, d distance / d z)}``; one compilation keeps the test fast."""
    out = {}
    for kind in KINDS:
        for chunk in (8192, 7):  # 120 patches: one chunk, and a padded scan over 18 chunks
            f = functools.partial(manifold_distance, params, kind=kind, chunk_size=chunk,
                                  target=tau if kind == "shell_band" else None)
            out[kind, chunk] = jax.value_and_grad(f)(z)
    return out


def test_parity_with_reference(ref, latents, tau, tmp_path):
    config = {"embedding_dim": D, "num_bases": K, "hidden_dim": H, "lr": 1e-3}  # extra keys are ignored
    params, config = load_manifold(write_ckpt(tmp_path / "ref.pt", ref.state_dict(), config, note="x"))
    assert (config.dim, config.num_anchors, config.hidden_dim, config.patch_size) == (D, K, H, (1, 1, 1))
    assert params.anchors.dtype == jnp.float32 and params.bn.count.dtype == jnp.int32
    assert int(params.bn.count) == 123
    got = jax_values_and_grads(params, jnp.asarray(channels_last(latents)), tau)
    for (kind, chunk), (value, grad) in got.items():
        want, want_grad = torch_value_and_grad(ref, latents, kind, tau if kind == "shell_band" else None)
        assert abs(float(value) - want) <= 1e-5 * abs(want), (kind, chunk, float(value), want)
        assert rel(grad, want_grad) <= 1e-5, (kind, chunk, rel(grad, want_grad))


def test_module_prefix_is_stripped(ref, tmp_path):
    plain, _ = load_manifold(write_ckpt(tmp_path / "plain.pt", ref.state_dict()))
    state = {"module." + k: v for k, v in ref.state_dict().items()}  # as saved from DataParallel/DDP
    prefixed, _ = load_manifold(write_ckpt(tmp_path / "ddp.pt", state))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(prefixed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_round_trip(ref, latents, tau, tmp_path):
    params, config = load_manifold(write_ckpt(tmp_path / "ref.pt", ref.state_dict()))
    out = save_manifold(params, config, tmp_path / "ours.pt", extra={"note": "shelllcc"})

    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["config"] == {"embedding_dim": D, "num_bases": K, "hidden_dim": H, "patch_size": [1, 1, 1]}
    assert ckpt["note"] == "shelllcc"
    assert ckpt["model"]["predictor.1.num_batches_tracked"].dtype == torch.int64
    assert all(v.dtype == torch.float32 for k, v in ckpt["model"].items() if "num_batches" not in k)

    fresh = ReferenceManifold(D, K, H)
    fresh.load_state_dict(ckpt["model"], strict=True)
    fresh = fresh.double().eval()
    got = jax_values_and_grads(params, jnp.asarray(channels_last(latents)), tau)  # cached compilation
    for kind in KINDS:
        want, want_grad = torch_value_and_grad(fresh, latents, kind, tau if kind == "shell_band" else None)
        value, grad = got[kind, 8192]
        assert abs(float(value) - want) <= 1e-5 * abs(want) and rel(grad, want_grad) <= 1e-5, kind

    again, config2 = load_manifold(out)
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_disagreeing_with_tensors(ref, tmp_path):
    path = write_ckpt(tmp_path / "bad.pt", ref.state_dict(),
                      config={"embedding_dim": D, "num_bases": K, "hidden_dim": 48})
    with pytest.raises(ValueError, match=r"predictor\.0\.weight.*\(32, 16\).*\(48, 16\)") as e:
        load_manifold(path)
    assert str(path) in str(e.value) and "surface_head.2.weight" in str(e.value)


def test_missing_state_key(ref, tmp_path):
    state = ref.state_dict()
    del state["surface_head.2.bias"]
    path = write_ckpt(tmp_path / "missing.pt", state)
    with pytest.raises((KeyError, ValueError), match=r"surface_head\.2\.bias") as e:
        load_manifold(path)
    assert str(path) in str(e.value)


def test_missing_config_key(ref, tmp_path):
    path = write_ckpt(tmp_path / "cfg.pt", ref.state_dict(), config={"embedding_dim": D, "hidden_dim": H})
    with pytest.raises(ValueError, match="num_bases") as e:
        load_manifold(path)
    assert str(path) in str(e.value)


def test_not_a_manifold_checkpoint(ref, tmp_path):
    torch.save(ref.state_dict(), tmp_path / "bare.pt")  # a bare state dict, no "model"
    with pytest.raises(ValueError, match="'model'"):
        load_manifold(tmp_path / "bare.pt")
    torch.save({"model": ref.state_dict()}, tmp_path / "noconfig.pt")
    with pytest.raises(ValueError, match="'config'"):
        load_manifold(tmp_path / "noconfig.pt")


def test_wrong_channel_count(ref, tmp_path):
    params, _ = load_manifold(write_ckpt(tmp_path / "ref.pt", ref.state_dict()))
    with pytest.raises(ValueError, match="C=8"):
        manifold_distance(params, jnp.zeros((1, 2, 3, 4, 8)), "shell_norm")


def test_stage1_loss_parity(ref, latents, tmp_path):
    """The torch restatement's stage-1 loss (BatchNorm on batch statistics) and its gradients match the core's."""
    import copy

    from shelllcc.manifold.losses import Stage1Weights, stage1_loss

    params, _ = load_manifold(write_ckpt(tmp_path / "ref.pt", ref.state_dict()))
    z = channels_last(latents).reshape(-1, D)
    weights = Stage1Weights(locality=0.3, usage=0.2, basis_to_patch=0.1)
    loss, grads = jax.value_and_grad(lambda p: stage1_loss(p, jnp.asarray(z), weights)[0], allow_int=True)(params)

    m = copy.deepcopy(ref).train()
    want = m.stage1_loss(torch.tensor(z, dtype=torch.float64), weights.locality, weights.usage,
                         weights.basis_to_patch)
    want.backward()
    assert abs(float(loss) - want.item()) <= 1e-5 * abs(want.item())
    assert rel(grads.anchors, m.basis.grad.numpy()) <= 1e-4
    assert rel(grads.coder.w2, m.predictor[5].weight.grad.numpy().T) <= 1e-4
    assert rel(grads.coder.bn_scale, m.predictor[1].weight.grad.numpy()) <= 1e-4
