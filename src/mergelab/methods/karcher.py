"""The Karcher (Riemannian, Fréchet) mean of N models on the sphere (mergekit's 'karcher')."""

from __future__ import annotations

import math

import torch

from mergelab.methods import sphere
from mergelab.methods.base import weighted_sum


def check_karcher(params: dict, where: str) -> str | None:
    """max_iter counts steps: a whole number."""
    if params["max_iter"] != int(params["max_iter"]):
        return f"karcher parameter 'max_iter' {where} is {params['max_iter']:g}; give a whole number of steps"
    return None


def karcher(tensors: list[torch.Tensor], base: torch.Tensor | None, *, max_iter: float,
            tol: float) -> torch.Tensor:
    """θ = (1/N Σ |θ_i|) · u,  u = the Karcher mean of the directions θ_i/|θ_i| on the unit sphere.

    u minimises Σ_i d(u, u_i)² (d = the angle) over the tensors whose norm exceeds ``tol``,
    with equal weights. From the normalised arithmetic mean, each step moves u along the
    great circle by the mean log map T = 1/M Σ θ_i/sin θ_i · (u_i − cos θ_i · u) (directions
    within ``tol`` of u are skipped), u ← cos|T|·u + sin|T|·T/|T|, for at most ``max_iter``
    steps or until |T| < ``tol``. The scale is the mean norm over all N tensors (a zero
    tensor counts as 0); all tensors within ``tol`` of zero give zero.

    u stays a combination Σ γ_j u_j of the directions, so the iteration runs on the N×N Gram
    matrix of the directions and the coefficients γ: the tensors are read a fixed number of
    times (norms, Gram matrix, result), however many steps it takes.

    Example:
        >>> a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
        >>> karcher([a, b], None, max_iter=10, tol=1e-5)  # halfway along the arc, mean norm 3
        tensor([2.1213, 2.1213])
    """
    count = len(tensors)
    if count == 1:
        return tensors[0]
    norms = [sphere.norm(tensor) for tensor in tensors]
    scale = sum(norms) / count
    valid = [i for i, norm in enumerate(norms) if norm > tol]
    if not valid:
        return tensors[0].zero_()
    units = [tensors[i].div_(norms[i]) for i in valid]  # u_i, in place
    gram = torch.tensor([[sphere.dot(a, b) for b in units] for a in units], dtype=torch.float64)  # (M, M)
    coefficients = _karcher_coefficients(gram, int(max_iter), tol)
    return weighted_sum(units, (coefficients * scale).tolist())


def _length(gram: torch.Tensor, coefficients: torch.Tensor) -> float:
    """|Σ c_j u_j| from the Gram matrix of the u_j."""
    return math.sqrt(max(float(coefficients @ gram @ coefficients), 0.0))


def _karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """γ with u = Σ γ_j u_j the Karcher mean of unit vectors whose Gram matrix is ``gram``."""
    count = gram.shape[0]
    weights = torch.full((count,), 1.0 / count, dtype=torch.float64)
    length = _length(gram, weights)
    if length < tol:  # the directions cancel: start from the first one
        u = torch.zeros(count, dtype=torch.float64)
        u[0] = 1.0
    else:
        u = weights / length
    for _ in range(max_iter):
        cosines = (gram @ u).clamp(-1.0, 1.0)  # cos θ_i = u · u_i, (M,)
        tangent = torch.zeros(count, dtype=torch.float64)  # T = Σ_j tangent_j u_j
        for i in range(count):
            angle = math.acos(float(cosines[i]))
            if angle < tol:
                continue
            step = float(weights[i]) * angle / math.sin(angle)
            tangent[i] += step
            tangent -= step * float(cosines[i]) * u
        tangent_length = _length(gram, tangent)
        if tangent_length < tol:
            break
        u = math.cos(tangent_length) * u + (math.sin(tangent_length) / tangent_length) * tangent
        u_length = _length(gram, u)
        if u_length > tol:
            u = u / u_length
    return u
