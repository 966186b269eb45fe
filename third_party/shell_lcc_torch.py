"""PyTorch restatement of the reference Shell-LCC manifold, for parity tests and benchmarks only.

Written from the formulas in DESIGN 2.1-2.3 with the reference checkpoint's state-dict layout
(DESIGN 4), so that ``load_state_dict(strict=True)`` accepts a reference checkpoint's ``"model"``::

    w_n     = softmax(predictor(z_n))                 predictor: Linear, BatchNorm1d, ReLU, Linear, ReLU, Linear
    zhat_n  = global_scale * (w_n @ basis) + global_bias
    lv_n    = surface_head(zhat_n)                    surface_head: Linear, ReLU, Linear
    delta_n = (z_n - zhat_n) / (exp(lv_n) + 1e-6)

    lcc        = mean_n ||z_n - zhat_n||^2
    shell_norm = mean_n ||delta_n||
    shell      = mean_n | ||delta_n|| - 1 |
    shell_band = | mean_n ||delta_n|| - tau |

Latents are channels-first ``[B, C, T, H, W]`` (the reference's layout) with patch size (1, 1, 1), or
flat patches ``[N, D]``. Call ``.eval()`` first: the reward uses BatchNorm's running statistics.
Works in any floating dtype (``.double()`` for float64 references). Never imports jax.
"""

from __future__ import annotations

import torch
from torch import nn

SHELL_EPS = 1e-6
KINDS = ("lcc", "shell_norm", "shell", "shell_band")


class ReferenceManifold(nn.Module):
    def __init__(self, embedding_dim: int, num_bases: int, hidden_dim: int):
        super().__init__()
        d, k, h = embedding_dim, num_bases, hidden_dim
        self.basis = nn.Parameter(torch.randn(k, d))
        self.global_scale = nn.Parameter(torch.ones(1))
        self.global_bias = nn.Parameter(torch.zeros(1, d))
        self.predictor = nn.Sequential(nn.Linear(d, h), nn.BatchNorm1d(h, eps=1e-5), nn.ReLU(),
                                       nn.Linear(h, h), nn.ReLU(), nn.Linear(h, k))
        self.surface_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))

    @staticmethod
    def patches(latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, T, H, W] -> [B*T*H*W, C]`` (position-major, channels last); ``[N, D]`` passes through."""
        if latents.dim() == 2:
            return latents
        if latents.dim() != 5:
            raise ValueError(f"expected [B, C, T, H, W] or [N, D] latents, got {tuple(latents.shape)}")
        return latents.permute(0, 2, 3, 4, 1).reshape(-1, latents.shape[1])

    def skeleton(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w [N, K], zhat [N, D])`` with ``zhat = s * (softmax(predictor(z)) @ basis) + b``."""
        w = torch.softmax(self.predictor(z), dim=-1)
        return w, self.global_scale * (w @ self.basis) + self.global_bias

    def log_variance(self, zhat: torch.Tensor) -> torch.Tensor:
        """``lv = surface_head(zhat) [N, D]``."""
        return self.surface_head(zhat)

    @staticmethod
    def delta(z: torch.Tensor, zhat: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        """``(z - zhat) / (exp(lv) + 1e-6)``: scaled by the variance, as the reference does."""
        return (z - zhat) / (torch.exp(log_var) + SHELL_EPS)

    def delta_norms(self, latents: torch.Tensor) -> torch.Tensor:
        """``||delta_n|| [N]``."""
        z = self.patches(latents)
        _, zhat = self.skeleton(z)
        return torch.linalg.vector_norm(self.delta(z, zhat, self.log_variance(zhat)), dim=-1)

    def lcc(self, latents: torch.Tensor) -> torch.Tensor:
        z = self.patches(latents)
        _, zhat = self.skeleton(z)
        return torch.sum((z - zhat) ** 2, dim=-1).mean()

    def shell_norm(self, latents: torch.Tensor) -> torch.Tensor:
        return self.delta_norms(latents).mean()

    def shell(self, latents: torch.Tensor) -> torch.Tensor:
        return (self.delta_norms(latents) - 1.0).abs().mean()

    def shell_band(self, latents: torch.Tensor, tau: float) -> torch.Tensor:
        return (self.delta_norms(latents).mean() - tau).abs()

    def distance(self, latents: torch.Tensor, kind: str, tau: float | None = None) -> torch.Tensor:
        """Dispatch on ``kind`` (one of :data:`KINDS`); ``tau`` only for ``shell_band``."""
        if kind not in KINDS:
            raise ValueError(f"unknown distance kind {kind!r}; expected one of {KINDS}")
        if kind == "shell_band":
            if tau is None:
                raise ValueError("kind='shell_band' needs tau")
            return self.shell_band(latents, tau)
        return getattr(self, kind)(latents)
