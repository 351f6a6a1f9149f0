"""Data-free subspace merges: TSV-M (Task Singular Vectors) and isotropic merging (Iso-C, Iso-CTS).

Each works on the task vectors τ_i = θ_i − θ_b of one 2-D weight matrix and returns
θ_b + alpha·Δ:

- ``tsv`` (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in
  Model Merging"): keep each τ_i's top k = int(fraction·r) singular triplets (r = min(m, n),
  fraction 1/N by default), concatenate the U's, the singular values and the V's, replace the
  concatenated U and V by their polar factors (the nearest matrices with orthonormal columns,
  which decorrelates the tasks' directions) and rebuild Δ = U⊥ diag(S) V⊥ᵀ.
- ``iso_c`` (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with
  Common and Task-Specific Subspaces", arXiv:2502.04959): Δ_TA = Σ τ_i = U S Vᵀ, and Δ =
  mean(S)·U Vᵀ: the summed task matrix with a flat (isotropic) spectrum.
- ``iso_cts`` (same paper): the top k singular vectors of Δ_TA span a common subspace, k =
  int(common_fraction·r) moved (as the reference code does) so that r − k splits evenly over
  the N tasks; each τ_i, projected off that subspace, adds its top (r − k)/N triplets; both
  concatenations are orthogonalized (polar factor) and the spectrum is the mean of every kept
  singular value. With common_fraction 1 it is Iso-C.

Tensors that are not 2-D (norms, biases) get θ_b + alpha·mean(τ_i), as the reference code
(FusionBench) does.

Where this deliberately goes beyond the papers' code (which calls ``torch.linalg.svd`` on
everything): singular triplets whose value is zero to working precision (s ≤ s_max·r·eps) are
left out, because their vectors are an arbitrary basis of a null space that LAPACK picks;
keeping them would put ``mean(S)`` along arbitrary directions (Iso-C of a rank-deficient sum)
or let them leak into the polar factor. The polar factor is therefore that of the range (a
partial isometry). On full-rank task matrices (any real fine-tune) nothing changes. ``tsv``
keeps at least one triplet per task (the reference's int(r/N) is 0 for r < N).

Cost, for an m×n matrix with r = min(m, n) and N tasks (one thread):

- exact SVD (``torch.linalg.svd``): O(m·n·r), used at or below ``EXACT_MAX_RANK``;
- top-k triplets above it (``tsv``, the task-specific parts of ``iso_cts``): a randomized SVD
  (``torch.svd_lowrank``, k + ``OVERSAMPLE`` columns, ``POWER_ITERATIONS`` power iterations),
  O(m·n·k), when k ≤ r/16; otherwise an eigendecomposition of the Gram matrix of the smaller
  side, O(m·n·r) for the product plus O(r³) for ``eigh``, in float64 (more accurate than a
  float32 SVD: 2e-9 against 2e-7 from a float64 SVD on a 768² Gaussian matrix);
- full spectrum above it (``iso_c``, the common subspace of ``iso_cts``): the same Gram route;
- the polar factor of a concatenation (p×q): ``eigh`` of its q×q Gram matrix, O(p·q² + q³).

So ``iso_c`` costs about one SVD per matrix, ``tsv`` N truncated SVDs plus two q×q ``eigh``
(q ≈ r), and ``iso_cts`` one SVD, N small truncated ones and two polar factors. Measured
seconds per matrix are in benchmarks/README.md (``benchmarks/bench_subspace.py``).

Example:
    >>> import torch
    >>> base = torch.zeros(2, 2)
    >>> iso_c([torch.diag(torch.tensor([3.0, 1.0]))], base, alpha=1.0)  # singular values 3, 1 → 2, 2
    tensor([[2., 0.],
            [0., 2.]])
"""

from __future__ import annotations

import torch

EXACT_MAX_RANK = 512  # min(m, n) at or below this: torch.linalg.svd (exact, and fast enough)
OVERSAMPLE = 16  # extra random columns of the randomized SVD
POWER_ITERATIONS = 4  # subspace iterations of the randomized SVD: 96% of the optimal energy at k = r/16 even
#                      on a flat (Gaussian) spectrum, where 2 iterations catch 90%
LOWRANK_MAX_SHARE = 1 / 16  # randomized SVD only for k ≤ this share of r: at k = r/4 on the benchmark's task
#                             vectors (a flat spectrum) its rank-k part was 45% off; the Gram route, 6e-6


# -- the methods --------------------------------------------------------------------------------
def tsv(tensors: list[torch.Tensor], base: torch.Tensor, *, alpha: float, fraction: float) -> torch.Tensor:
    """TSV-M: θ_b + alpha·U⊥ diag(S) V⊥ᵀ from each task's top int(fraction·r) singular triplets.

    Args:
        tensors: the N expert tensors (overwritten and released as they are used).
        base: the base tensor (never modified).
        alpha: scale of the merged task matrix.
        fraction: share of each task's rank kept; 0 means 1/N (the paper's choice).

    Returns:
        The merged tensor.
    """
    if base.dim() != 2:
        return _mean_task_vector(tensors, base, alpha)
    n_tasks = len(tensors)
    rank = min(base.shape)
    keep = max(1, int(rank * fraction) if fraction > 0 else rank // n_tasks)  # // : no float rounding of r·(1/N)
    us, ss, vhs = [], [], []
    for index in range(n_tasks):
        task_vector = tensors[index].sub_(base)  # τ_i, in the expert's own buffer
        for collected, part in zip((us, ss, vhs), top_singular(task_vector, keep)):
            collected.append(part)
        tensors[index] = task_vector = None  # release as we go
    u_cat, s_cat, vh_cat = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)  # (m, q), (q,), (q, n)
    del us, vhs
    u_orth = polar(u_cat)
    v_orth = polar(vh_cat.T)
    merged = (u_orth * s_cat.to(u_orth.dtype)) @ v_orth.T  # (m, n)
    return merged.mul_(alpha).add_(base)


def iso_c(tensors: list[torch.Tensor], base: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """Iso-C: θ_b + alpha·mean(S)·U Vᵀ, where U S Vᵀ = Σ τ_i.

    Args:
        tensors: the N expert tensors (overwritten and released as they are used).
        base: the base tensor (never modified).
        alpha: scale of the merged task matrix.

    Returns:
        The merged tensor.
    """
    if base.dim() != 2:
        return _mean_task_vector(tensors, base, alpha)
    summed = _sum_task_vectors(tensors, base)  # Δ_TA, (m, n)
    return isotropic(summed).mul_(alpha).add_(base)


def iso_cts(tensors: list[torch.Tensor], base: torch.Tensor, *, alpha: float,
            common_fraction: float) -> torch.Tensor:
    """Iso-CTS: Iso-C on the common subspace of Σ τ_i plus each task's own directions outside it.

    Args:
        tensors: the N expert tensors (overwritten, and released once projected).
        base: the base tensor (never modified).
        alpha: scale of the merged task matrix.
        common_fraction: share of the rank given to the common subspace (adjusted so that the
            rest splits evenly over the N tasks).

    Returns:
        The merged tensor.
    """
    if base.dim() != 2:
        return _mean_task_vector(tensors, base, alpha)
    n_tasks = len(tensors)
    rank = min(base.shape)
    common, per_task = common_split(rank, n_tasks, common_fraction)
    task_vectors = [tensor.sub_(base) for tensor in tensors]  # τ_i in the experts' buffers
    summed = task_vectors[0].clone()  # Δ_TA, (m, n)
    for task_vector in task_vectors[1:]:
        summed.add_(task_vector)
    if per_task == 0:  # the common subspace is everything: Iso-C
        del task_vectors
        tensors[:] = [None] * n_tasks  # release the task vectors
        return isotropic(summed).mul_(alpha).add_(base)
    u_common, s_common, vh_common = top_singular(summed, common)  # (m, k), (k,), (k, n)
    del summed
    us, ss, vhs = [u_common], [s_common], [vh_common]
    for index, task_vector in enumerate(task_vectors):
        task_vector.sub_(u_common @ (u_common.T @ task_vector))  # τ_i off the common subspace
        for collected, part in zip((us, ss, vhs), top_singular(task_vector, per_task)):
            collected.append(part)
        task_vectors[index] = tensors[index] = None  # release as we go
    u_orth = polar(torch.cat(us, dim=1))  # (m, q)
    v_orth = polar(torch.cat(vhs, dim=0).T)  # (n, q)
    scale = torch.cat(ss).sum().item() / (common + n_tasks * per_task)  # mean of the r kept values (0s included)
    merged = u_orth @ v_orth.T
    return merged.mul_(scale * alpha).add_(base)


def common_split(rank: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common directions k, directions per task): k starts at int(rank·common_fraction) and
    moves so that rank − k = n_tasks·per_task, the per-task count rounded as the reference
    code rounds it (never below 0 or above rank // n_tasks)."""
    start = int(rank * common_fraction)
    per_task = min(round((rank - start) / n_tasks), rank // n_tasks)
    return rank - n_tasks * per_task, per_task


def subspace_notes(params: dict, numel: int) -> list[str]:
    """The plan-time note: what tensors that are not matrices get."""
    return ["tensors that are not 2-D (norms, biases) are merged as θ_b + alpha·mean(τ_i), as the reference code "
            "(FusionBench) does; mergekit has no such method"]


# -- linear algebra -----------------------------------------------------------------------------
def _tolerance(values: torch.Tensor, size: int, gram: bool = False) -> float:
    """Singular values at or below this are zero to working precision: LAPACK's rank tolerance
    s_max·size·eps(float32) for a float32 SVD; for the float64 Gram route, where an exact null
    direction comes out near s_max·sqrt(size·eps(float64)), twice that (about 1e-6·s_max at
    size 2048, so that only exact null directions of a real task matrix fall below it)."""
    if values.numel() == 0:
        return 0.0
    if gram:
        return float(values.max()) * 2.0 * (size * torch.finfo(torch.float64).eps) ** 0.5
    return float(values.max()) * size * torch.finfo(torch.float32).eps


def top_singular(matrix: torch.Tensor, k: int, how: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets (U (m, k'), S (k',), Vᵀ (k', n)) of ``matrix``, without those
    that are zero to working precision (so k' ≤ k).

    ``how``: "svd" (``torch.linalg.svd``), "lowrank" (randomized) or "gram" (``eigh`` of the
    smaller side's Gram matrix); None picks by size (see the module docstring).
    """
    rank = min(matrix.shape)
    k = min(k, rank)
    if how is None:
        how = "svd" if rank <= EXACT_MAX_RANK else "lowrank" if k <= rank * LOWRANK_MAX_SHARE else "gram"
    if how == "svd":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    elif how == "lowrank":
        u, s, v = torch.svd_lowrank(matrix, q=min(rank, k + OVERSAMPLE), niter=POWER_ITERATIONS)
        vh = v.T
    elif how == "gram":
        u, s, vh = _gram_svd(matrix)
    else:
        raise ValueError(f"unknown SVD route {how!r}")
    tol = _tolerance(s, max(matrix.shape), gram=how == "gram")
    kept = int((s[:k] > tol).sum())
    return u[:, :kept], s[:kept], vh[:kept]


def _gram_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD through ``eigh`` of the Gram matrix of the smaller side (float64), singular
    values in descending order. Directions whose value is zero to working precision get zero
    vectors on the recovered side instead of a division by ~0."""
    wide = matrix.shape[0] <= matrix.shape[1]
    side = matrix if wide else matrix.T  # (r, l), r ≤ l
    precise = side.double()
    eigenvalues, eigenvectors = torch.linalg.eigh(precise @ precise.T)  # ascending, (r,), (r, r)
    values = eigenvalues.clamp_(min=0).sqrt_().flip(0)
    left = eigenvectors.flip(1)  # (r, r)
    tol = _tolerance(values, max(matrix.shape), gram=True)
    inverse = torch.where(values > tol, 1.0 / values.clamp(min=tol if tol > 0 else 1.0), torch.zeros_like(values))
    right = (left.T @ precise) * inverse[:, None]  # (r, l): rows are the other side's singular vectors
    left, values, right = left.to(matrix.dtype), values.to(matrix.dtype), right.to(matrix.dtype)
    return (left, values, right) if wide else (right.T, values, left.T)


def polar(matrix: torch.Tensor, how: str | None = None) -> torch.Tensor:
    """The orthogonal polar factor of a (p, q) matrix, U Vᵀ from its SVD U S Vᵀ, over its range:
    directions with a zero singular value (to working precision) are left out, so a matrix with
    dependent columns gives a partial isometry instead of an arbitrary completion.

    ``how``: "svd" or "gram" (``eigh`` of the q×q Gram matrix, float64); None picks by size.
    """
    if how is None:
        how = "svd" if min(matrix.shape) <= EXACT_MAX_RANK else "gram"
    if how == "svd":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        kept = s > _tolerance(s, max(matrix.shape))
        return u[:, kept] @ vh[kept]
    precise = matrix.double()
    eigenvalues, eigenvectors = torch.linalg.eigh(precise.T @ precise)  # (q,), (q, q)
    values = eigenvalues.clamp_(min=0).sqrt_()
    tol = _tolerance(values, max(matrix.shape), gram=True)
    inverse = torch.where(values > tol, 1.0 / values.clamp(min=tol if tol > 0 else 1.0), torch.zeros_like(values))
    root = (eigenvectors * inverse) @ eigenvectors.T  # (MᵀM)^(-1/2) over the range, (q, q)
    return (precise @ root).to(matrix.dtype)


def isotropic(matrix: torch.Tensor, how: str | None = None) -> torch.Tensor:
    """mean(S)·U Vᵀ for ``matrix`` = U S Vᵀ: its singular vectors with a flat spectrum (the mean
    is over all min(m, n) values; directions with value zero are left out, see ``polar``).

    ``how``: "svd" or "gram" (``eigh`` of the smaller side's Gram matrix, float64); None picks
    by size. Overwrites nothing; returns a new tensor.
    """
    rank = min(matrix.shape)
    if how is None:
        how = "svd" if rank <= EXACT_MAX_RANK else "gram"
    if how == "svd":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        kept = s > _tolerance(s, max(matrix.shape))
        return (u[:, kept] @ vh[kept]).mul_(s.mean())
    wide = matrix.shape[0] <= matrix.shape[1]
    side = (matrix if wide else matrix.T).double()  # (r, l)
    eigenvalues, eigenvectors = torch.linalg.eigh(side @ side.T)  # (r,), (r, r)
    values = eigenvalues.clamp_(min=0).sqrt_()
    tol = _tolerance(values, max(matrix.shape), gram=True)
    inverse = torch.where(values > tol, 1.0 / values.clamp(min=tol if tol > 0 else 1.0), torch.zeros_like(values))
    root = (eigenvectors * (inverse * values.mean())) @ eigenvectors.T  # mean(S)·(A Aᵀ)^(-1/2), (r, r)
    result = (root @ side).to(matrix.dtype)  # mean(S)·U Vᵀ on the smaller side's orientation
    return result if wide else result.T.contiguous()


# -- helpers ------------------------------------------------------------------------------------
def _sum_task_vectors(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Σ τ_i, accumulated into the first expert's buffer; the list is emptied as it goes."""
    summed = tensors[0].sub_(base)
    for index in range(1, len(tensors)):
        summed.add_(tensors[index]).sub_(base)
        tensors[index] = None
    tensors[0] = None
    return summed


def _mean_task_vector(tensors: list[torch.Tensor], base: torch.Tensor, alpha: float) -> torch.Tensor:
    n_tasks = len(tensors)
    return _sum_task_vectors(tensors, base).mul_(alpha / n_tasks).add_(base)
