"""Noise levels: training-time sampling of ``s`` and the inference sigma schedule.

Noise level ``s`` in ``[0, 1]`` (``x_s = (1 - s) x0 + s eps``, see :mod:`shelllcc.flow.rectified`).

Shift map (Wan / SD3 "flow shift" ``k``)::

    shift_k(s) = k s / (1 + (k - 1) s)

It fixes 0 and 1, is strictly increasing on ``[0, 1]`` for ``k > 0``, ``shift_1`` is the identity,
``shift_a(shift_b(s)) = shift_{ab}(s)`` and ``shift_{1/k}`` is its inverse. ``k > 1`` moves mass
towards high noise, which large (video) latents need because their signal survives more noise.

Inference schedule (:func:`wan_sampling_schedule`) reproduces diffusers'
``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=k, prediction_type="flow_prediction",
final_sigmas_type="zero", timestep_spacing="linspace", num_train_timesteps=1000)`` after
``set_timesteps(n)``, the configuration of the Wan2.1 diffusers checkpoints:

* ``n`` model evaluations at ``sigma_i = shift_k(u_i)``, ``u = linspace(1, 1/1000, n + 1)[:-1]``
  (so the last evaluated level is ``shift_k(1/1000 + (n - 1)/n * ...)``, never 0),
* the first level is pulled from 1 to ``1 - 1e-6`` so that ``log(1 - sigma)`` stays finite in the
  solver's log-SNR,
* a final ``sigma_n = 0`` is appended (the sampler's last step lands on the data),
* sigmas are stored in float32; model timesteps are ``trunc(1000 * sigma_i)`` computed from the
  float64 sigmas, i.e. integers (diffusers casts them to int64).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from shelllcc.flow.rectified import NUM_TRAIN_TIMESTEPS

# ----------------------------------------------------------------------------------------------
# Shift map
# ----------------------------------------------------------------------------------------------


def shift_sigmas(s, shift: float):
    """``k s / (1 + (k - 1) s)``: works on numpy arrays, jax arrays and Python floats."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * s / (1 + (shift - 1) * s)


# ----------------------------------------------------------------------------------------------
# Training-time noise levels
# ----------------------------------------------------------------------------------------------


def uniform_sigmas(key, shape, lo: float = 0.0, hi: float = 1.0, dtype=jnp.float32):
    """``s ~ U[lo, hi)``; e.g. the reference one-step reward objective uses ``U[0.7, 1.0)``."""
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"need 0 <= lo <= hi <= 1, got lo={lo}, hi={hi}")
    return jax.random.uniform(key, shape, dtype, minval=lo, maxval=hi)


def logit_normal_sigmas(key, shape, mean: float = 0.0, std: float = 1.0, dtype=jnp.float32):
    """``s = sigmoid(mean + std * n)``, ``n ~ N(0, 1)``: SD3's logit-normal, ``logit(s) ~ N(mean, std^2)``."""
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    n = jax.random.normal(key, shape, jnp.float32)
    return jax.nn.sigmoid(mean + std * n).astype(dtype)


def sample_training_sigmas(
    key,
    shape,
    distribution: str = "uniform",
    *,
    lo: float = 0.0,
    hi: float = 1.0,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    dtype=jnp.float32,
):
    """Noise levels for a training batch: a base distribution, then the shift map.

    Args:
      distribution: ``"uniform"`` (``U[lo, hi)``) or ``"logit_normal"`` (``sigmoid(N(mean, std^2))``).
      shift: ``k`` of :func:`shift_sigmas`, applied after the base draw (``1.0``: no shift).

    Returns ``s`` of ``shape``; multiply by 1000 (:func:`shelllcc.flow.rectified.model_timestep`) for
    the model's timestep input.
    """
    if distribution == "uniform":
        s = uniform_sigmas(key, shape, lo, hi, jnp.float32)
    elif distribution in ("logit_normal", "logit-normal", "lognorm"):
        s = logit_normal_sigmas(key, shape, mean, std, jnp.float32)
    else:
        raise ValueError(f"unknown noise-level distribution {distribution!r}; "
                         "use 'uniform' or 'logit_normal'")
    if shift != 1.0:
        s = shift_sigmas(s, shift)
    return s.astype(dtype)


# ----------------------------------------------------------------------------------------------
# Inference schedule
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class FlowSchedule:
    """A sampling schedule: host-side constants, fixed at trace time.

    Attributes:
      sigmas: ``[n + 1]`` float32, decreasing, ``sigmas[n]`` the level the sampler ends on (0 for
        sampling to data).
      timesteps: ``[n]`` float32, the model's timestep input at each of the ``n`` evaluations.

    Hashable by value so it can be a static argument of ``jax.jit``.
    """

    sigmas: np.ndarray
    timesteps: np.ndarray

    def __post_init__(self):
        sig = np.asarray(self.sigmas, np.float32)
        ts = np.asarray(self.timesteps, np.float32)
        if sig.ndim != 1 or sig.shape[0] < 2:
            raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {sig.shape}")
        if ts.shape != (sig.shape[0] - 1,):
            raise ValueError(f"timesteps must have shape [{sig.shape[0] - 1}], got {ts.shape}")
        if np.any(np.diff(sig) >= 0):
            raise ValueError("sigmas must be strictly decreasing")
        if sig[0] > 1.0 or sig[-1] < 0.0:
            raise ValueError("sigmas must lie in [0, 1]")
        sig.setflags(write=False)
        ts.setflags(write=False)
        object.__setattr__(self, "sigmas", sig)
        object.__setattr__(self, "timesteps", ts)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def __hash__(self):
        return hash((self.sigmas.tobytes(), self.timesteps.tobytes()))

    def __eq__(self, other):
        return (isinstance(other, FlowSchedule) and np.array_equal(self.sigmas, other.sigmas)
                and np.array_equal(self.timesteps, other.timesteps))

    @classmethod
    def from_sigmas(cls, sigmas, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                    append_zero: bool = False) -> "FlowSchedule":
        """A schedule with continuous timesteps ``num_train_timesteps * sigma_i``.

        ``sigmas`` lists the evaluation levels (and the final level unless ``append_zero``).
        """
        sig = np.asarray(sigmas, np.float64)
        if append_zero:
            sig = np.concatenate([sig, [0.0]])
        return cls(sigmas=sig.astype(np.float32),
                   timesteps=(sig[:-1] * num_train_timesteps).astype(np.float32))


def wan_sampling_schedule(num_steps: int, shift: float = 3.0,
                          num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                          integer_timesteps: bool = True) -> FlowSchedule:
    """Wan2.1's sampling schedule (identical to diffusers' UniPC flow-sigma schedule, see module doc).

    Args:
      num_steps: number of model evaluations ``n`` (Wan's default is 50).
      shift: ``flow_shift`` ``k`` (Wan2.1: 3.0 for 480p, 5.0 for 720p).
      integer_timesteps: ``True`` reproduces diffusers (model timesteps truncated to integers);
        ``False`` gives the exact ``1000 * sigma_i``, for analytic velocity fields.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    u = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)[:-1]
    sig = shift * u / (1 + (shift - 1) * u)
    if abs(sig[0] - 1.0) < 1e-6:
        # log(alpha) = log(1 - sigma) must stay finite for the log-SNR solvers
        sig[0] -= 1e-6
    t = sig * num_train_timesteps
    if integer_timesteps:
        t = np.trunc(t)
    sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)
    return FlowSchedule(sigmas=sigmas, timesteps=t.astype(np.float32))


def linear_sampling_schedule(num_steps: int, shift: float = 1.0, s_max: float = 1.0,
                             num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> FlowSchedule:
    """``shift_k(linspace(s_max, 0, n + 1))`` with continuous timesteps: the textbook schedule.

    ``s_max = 1`` makes the first level exactly 1, which the Euler sampler handles but the log-SNR
    solver (UniPC) does not; use :func:`wan_sampling_schedule` there.
    """
    sig = shift_sigmas(np.linspace(s_max, 0.0, num_steps + 1), shift)
    return FlowSchedule.from_sigmas(sig, num_train_timesteps)
