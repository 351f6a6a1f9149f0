"""RegMean (Jin et al. ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

A linear layer y = W x of expert i was fit to its inputs X_i; the merged W that minimizes
Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² is Wᵀ = (Σ G_i)⁻¹ Σ G_i W_iᵀ with G_i = X_iᵀ X_i, the Gram matrix
of the layer's inputs. The paper scales the off-diagonal entries of each Gram by ``alpha``
(G̃_i = α G_i + (1 − α) diag(G_i)), which keeps the sum invertible and pulls the result
toward the average. Tensors without Grams (embeddings, norms, biases) are averaged.

The Grams come from ``mergelab regmean-stats`` (``mergelab.data_aware.regmean_stats``): one
[in, in] float tensor per linear weight [out, in], keyed by the weight's name.
"""

from __future__ import annotations

import torch

from mergelab.errors import MergelabError


def regmean(tensors: list[torch.Tensor], base: torch.Tensor | None, *, gram: list[torch.Tensor | None],
            alpha: float) -> torch.Tensor:
    """Wᵀ = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ for a weight whose experts all have a Gram; the mean otherwise.

    Args:
        tensors: the experts' tensors; a weight is [out, in] (nn.Linear's orientation).
        gram: per expert, the Gram X_iᵀ X_i [in, in] of the layer's inputs, or None where the
            tensor has none (then every expert must have none).
        alpha: the scale of the Grams' off-diagonal entries (the paper's 0.9; 1: plain RegMean).

    Example:
        >>> a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> regmean([a, b], None, gram=[torch.eye(2), torch.eye(2)], alpha=0.9)
        tensor([[0.5000, 0.5000]])
    """
    present = [g is not None for g in gram]
    if len(gram) != len(tensors):
        raise MergelabError(f"regmean got {len(gram)} Gram matrices for {len(tensors)} models; give one per model")
    if not any(present):
        return torch.stack(tensors).mean(0)
    if not all(present):
        raise MergelabError("regmean: some models have a Gram matrix for this tensor and others do not; compute "
                            "every model's statistics with `mergelab regmean-stats` on the same architecture")
    columns = tensors[0].shape[-1]
    if tensors[0].dim() != 2 or any(g.shape != (columns, columns) for g in gram):
        raise MergelabError(f"regmean: a Gram matrix of shape {tuple(gram[0].shape)} does not fit a tensor of shape "
                            f"{tuple(tensors[0].shape)}; it must be [in, in] for a weight [out, in]")
    # float64 for the solve: Grams of many tokens span several orders of magnitude. One scaled
    # Gram at a time, so memory stays at two [in, in] float64 matrices whatever the model count.
    total = torch.zeros(columns, columns, dtype=torch.float64, device=tensors[0].device)  # Σ G̃_i (in, in)
    rhs = torch.zeros(columns, tensors[0].shape[0], dtype=torch.float64, device=tensors[0].device)  # Σ G̃_i W_iᵀ
    for g, weight in zip(gram, tensors):
        scaled = _scale_off_diagonal(g.to(torch.float64), alpha)
        total.add_(scaled)
        rhs.addmm_(scaled, weight.to(torch.float64).T)
        del scaled
    # an input feature that is zero on every example of every expert has a zero row and column
    # in every Gram, which leaves its column of W free: give it the experts' mean column
    # (a unit diagonal in each G̃_i) instead of a singular system
    unseen = total.diagonal() == 0
    if bool(unseen.any()):
        total.diagonal()[unseen] = float(len(tensors))
        rhs[unseen] = torch.stack([weight.to(torch.float64).T[unseen] for weight in tensors]).sum(0)
    solution, info = torch.linalg.solve_ex(total, rhs)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        raise MergelabError(f"regmean: the summed Gram matrix ({columns}x{columns}) is singular at alpha {alpha:g}; "
                            f"set alpha below 1 (the paper's 0.9) or compute the statistics on more examples")
    return solution.T.to(tensors[0].dtype).contiguous()


def _scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α G + (1 − α) diag(G): the off-diagonal entries times α, the diagonal kept."""
    diagonal = gram.diagonal().clone()
    scaled = gram.mul(alpha)
    scaled.diagonal().copy_(diagonal)
    return scaled


def regmean_notes(params: dict, numel: int) -> list[str]:
    return ["tensors without a Gram matrix (embeddings, norms, biases, a tied lm_head) are averaged, as the paper "
            "does"]
