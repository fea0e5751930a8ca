"""A gradient-trained MPS classifier in torch autograd: the peer of ``lotus_rt.mps``'s DMRG.

The model is ``MPSClassifier``'s (one site per pixel, the local feature map of
``lotus_rt.mps.features``, the label index on the centre site, environments normalised per
sample), but all site tensors are parameters at the full bond dimension D, trained end to end
by Adam on the cross-entropy of the scores, as TorchMPS and the TensorNetwork library do.
Sites start near the identity (A[a, s, b] = delta_ab / d + noise), which passes each sample's
environment through the chain unchanged, so that gradients reach every site from the start.

    >>> model = TorchMPS(196, bond_dim=20)                                     # doctest: +SKIP
    >>> history = train(model, x_train, y_train, epochs=10, x_val=x_test, y_val=y_test)  # doctest: +SKIP

The forward runs one small GEMM per site (n x dD x D) for the left half, one for the right
half, and contracts both with the centre; nothing here runs on lotus_rt's runtime.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lotus_rt.mps import features


class TorchMPS(nn.Module):
    """Scores (n, n_labels) of (n, n_sites) pixels in [0, 1]."""

    def __init__(self, n_sites: int, bond_dim: int, n_labels: int = 10, feature_map: str = "cos-sin",
                 init_std: float = 1e-2, dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        if n_sites < 2 or bond_dim < 1 or n_labels < 2:
            raise ValueError(f"TorchMPS: n_sites={n_sites} (>= 2), bond_dim={bond_dim} (>= 1) and "
                             f"n_labels={n_labels} (>= 2) are required")
        self.feature_map = features.check_feature_map(feature_map)
        self.n_sites, self.bond_dim, self.n_labels = n_sites, bond_dim, n_labels
        self.center_site = n_sites // 2 - 1 if n_sites > 2 else 0
        d = features.LOCAL_DIM
        gen = torch.Generator().manual_seed(seed)
        eye = torch.eye(bond_dim, dtype=dtype)[:, None, :].expand(bond_dim, d, bond_dim) / d
        noise = torch.randn((n_sites, bond_dim, d, bond_dim), generator=gen, dtype=dtype) * init_std
        self.sites = nn.Parameter(eye + noise)
        center = torch.randn((bond_dim, d, bond_dim, n_labels), generator=gen, dtype=dtype)
        self.center = nn.Parameter(center * init_std)

    def phi(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = pixels.detach().cpu().numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
        x = features.check_pixels(x, self.n_sites)
        return torch.from_numpy(features.sample_major(x, self.feature_map)).to(self.sites.dtype)

    @staticmethod
    def _step(env: torch.Tensor, phi: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        n, dim = env.shape
        out = (env[:, :, None] * phi[:, None, :]).reshape(n, -1) @ site.reshape(-1, site.shape[-1])
        return out / out.norm(dim=1, keepdim=True).clamp_min(1e-30)

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        """Scores from features ``phi`` (n, n_sites, d) (see ``phi()``)."""
        n, c = phi.shape[0], self.center_site
        left = phi.new_zeros((n, self.bond_dim))
        left[:, 0] = 1
        right = left.clone()
        sites = self.sites.unbind(0)  # one view per site; indexing per site would cost O(N^2) in backward
        feats = phi.unbind(1)
        for j in range(c):
            left = self._step(left, feats[j], sites[j])
        for j in range(self.n_sites - 1, c, -1):  # the mirror image: sites read right to left
            right = self._step(right, feats[j], sites[j].transpose(0, 2))
        return torch.einsum("na,ns,asbl,nb->nl", left, phi[:, c], self.center, right)


@dataclass
class EpochReport:
    epoch: int
    seconds: float
    train_loss: float
    val_accuracy: float | None


def accuracy(model: TorchMPS, phi: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    with torch.no_grad():
        pred = torch.cat([model(phi[i:i + batch]).argmax(1) for i in range(0, len(phi), batch)])
    return float((pred == labels).float().mean())


def train(model: TorchMPS, x: Any, y: Any, *, epochs: int = 10, batch: int = 64, lr: float = 1e-3,
          x_val: Any = None, y_val: Any = None, seed: int = 0, time_budget: float | None = None,
          on_epoch: Callable[[EpochReport], None] | None = None) -> list[EpochReport]:
    """Adam on the cross-entropy, ``epochs`` passes (or until ``time_budget`` seconds)."""
    phi = model.phi(x)
    labels = torch.as_tensor(np.asarray(y), dtype=torch.long)
    if labels.shape != (len(phi),) or labels.min() < 0 or labels.max() >= model.n_labels:
        raise ValueError(f"y must hold {len(phi)} labels in 0..{model.n_labels - 1}")
    phi_val = model.phi(x_val) if x_val is not None else None
    labels_val = torch.as_tensor(np.asarray(y_val), dtype=torch.long) if y_val is not None else None
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history, start = [], time.perf_counter()
    for epoch in range(1, epochs + 1):
        t0, total = time.perf_counter(), 0.0
        order = torch.randperm(len(phi), generator=gen)
        for i in range(0, len(phi), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(phi[idx]), labels[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        report = EpochReport(epoch, time.perf_counter() - t0, total / len(phi),
                             accuracy(model, phi_val, labels_val) if phi_val is not None else None)
        history.append(report)
        if on_epoch is not None:
            on_epoch(report)
        if time_budget is not None and time.perf_counter() - start >= time_budget:
            break
    return history
