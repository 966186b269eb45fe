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

and the stage-1 fitting loss of DESIGN 2.1 (predictor's BatchNorm in training mode: batch statistics)::

    d2_nk  = ||z_n - basis_k||^2,   p = mean_n w_n
    stage1 = mean_{n,d} (zhat_n - z_n)^2 + l_loc mean_n sum_k w_nk d2_nk + l_use sum_k p_k log(K p_k)
             + l_b2p mean_k min_n d2_nk

Latents are channels-first ``[B, C, T, H, W]`` (the reference's layout) with patch size (1, 1, 1), or
flat patches ``[N, D]``. Call ``.eval()`` first: the reward uses BatchNorm's running statistics.
Works in any floating dtype (``.double()`` for float64 references). Never imports jax.
"""

from __future__ import annotations

import math
import os

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

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceManifold":
        """A reference checkpoint (``{"model": state_dict, "config": {embedding_dim, num_bases, hidden_dim}}``,
        as ``shell_lcc_reference.save_manifold`` writes it), loaded strictly on the CPU, in eval mode."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        cfg = ckpt["config"]
        m = cls(cfg["embedding_dim"], cfg["num_bases"], cfg["hidden_dim"])
        m.load_state_dict(ckpt["model"], strict=True)
        return m.eval()

    def checkpoint(self, state: dict | None = None) -> dict:
        """``{"model": state (default: the state dict), "config": ...}``, readable by ``load`` and by
        ``shell_lcc_reference.load_manifold``; ``state`` may hold other tensors of the same layout."""
        k, d = self.basis.shape
        return {"model": self.state_dict() if state is None else state,
                "config": {"embedding_dim": d, "num_bases": k, "hidden_dim": self.surface_head[0].out_features}}

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

    def stage1_loss(self, z: torch.Tensor, locality: float, usage: float, basis_to_patch: float) -> torch.Tensor:
        """The stage-1 loss of patches ``z [N, D]`` (see the module docstring); call ``.train()`` first."""
        w, zhat = self.skeleton(z)
        d2 = ((z * z).sum(-1, keepdim=True) + (self.basis * self.basis).sum(-1)
              - 2.0 * (z @ self.basis.T)).clamp_min(0.0)                       # [N, K]
        p = w.mean(0)
        l_use = (p * (p.clamp_min(1e-12).log() + math.log(p.shape[0]))).sum()
        l_b2p = d2.amin(0).mean()   # amin splits the gradient among ties, as jnp.min does
        return ((zhat - z) ** 2).mean() + locality * (w * d2).sum(-1).mean() + usage * l_use + basis_to_patch * l_b2p

    def distance(self, latents: torch.Tensor, kind: str, tau: float | None = None) -> torch.Tensor:
        """Dispatch on ``kind`` (one of :data:`KINDS`); ``tau`` only for ``shell_band``."""
        if kind not in KINDS:
            raise ValueError(f"unknown distance kind {kind!r}; expected one of {KINDS}")
        if kind == "shell_band":
            if tau is None:
                raise ValueError("kind='shell_band' needs tau")
            return self.shell_band(latents, tau)
        return getattr(self, kind)(latents)
