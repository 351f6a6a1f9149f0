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
everything): singular triplets whose value is zero to working precision (s ≤ ``NULL_RTOL``·s_max)
are left out, because their vectors are an arbitrary basis of a null space that LAPACK picks;
keeping them would put ``mean(S)`` along arbitrary directions (Iso-C of a rank-deficient sum)
or let them leak into the polar factor. The polar factor is therefore that of the range (a
partial isometry). On full-rank task matrices (any real fine-tune) nothing changes. ``tsv``
keeps at least one triplet per task (the reference's int(r/N) is 0 for r < N).

How the SVDs are computed (float32 throughout; l = max(m, n), r = min(m, n), N tasks):

- r ≤ ``EXACT_MAX_RANK``: ``torch.linalg.svd``.
- above it, "gram" (exact to float32 accuracy): ``eigh`` of the r×r Gram matrix of the smaller
  side, in levels (``_gram_svd``): a level trusts the eigenvalues within three decades of its
  largest and recomputes the rest from the block they span, so that directions with
  s < 3e-4·s_max keep their accuracy (a single float32 ``eigh`` of the Gram matrix loses them:
  2% off on the benchmark's Iso-C; these levels: 1.3e-5 against a float64 SVD, where the output
  cast to bfloat16 moves it by 1e-2). Flops: Gram 2·l·r², ``eigh`` about 9·r³ (partly bound by
  memory: 1.9 s at r = 2048 on one core here, as much as six 2048³ products), left vectors
  2·l·r·k; on a flat spectrum one level, on a decaying one a few, each on fewer columns. About
  3.5× cheaper than ``torch.linalg.svd`` in float32, and than the same route in float64.
- top k with k ≤ ``LOWRANK_MAX_SHARE``·r: "lowrank", a randomized SVD (``torch.svd_lowrank``,
  k + ``OVERSAMPLE`` columns, ``POWER_ITERATIONS`` power iterations; (4 + 4·POWER_ITERATIONS)·
  m·n·(k + OVERSAMPLE) flops). This one is approximate: within 1e-4 of the exact top-k part on
  low-rank-plus-noise matrices (the shape of fine-tuning task matrices), but not on a flat
  spectrum (pure noise), where the top k directions are ill-defined anyway. Only the
  task-specific parts of ``iso_cts`` (k = 102 of 2048 by default) take it;
  ``top_singular(..., how="gram")`` forces the exact route.

Per m×n matrix that makes ``iso_c`` one Gram-route SVD plus U·Vᵀ: 6·l·r² + eigh(r) flops;
``tsv`` N top-k SVDs (N·(2·l·r² + eigh(r) + 2·l·r·k)) and two polar factors of the (m, N·k)
and (n, N·k) concatenations (each 6·p·q² + eigh(q), q = N·k ≤ r), plus 2·m·n·q to rebuild;
``iso_cts`` the common part of Σ τ_i (2·l·r² + eigh(r)), N projections (4·m·n·k_common) and
randomized top-k's, the polar factor of the (n, r) V's (6·n·r² + eigh(r)) and that of the task
U's only (m × N·k_task; the common U's are orthonormal and orthogonal to them), and 2·m·n·r to
rebuild. ``eigh`` dominates: ``iso_c`` costs about one, ``iso_cts`` two, ``tsv`` N + 2 of them
per matrix. Measured seconds per matrix are in
benchmarks/README.md (``benchmarks/bench_subspace.py``).

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
GRAM_FLOOR = 1e-3  # Gram eigenvalues below this share of the largest are recomputed from their own block
SMALL_BLOCK = 64  # the Gram route's blocks of at most this many columns go to torch.linalg.svd
NULL_RTOL = 1e-5  # singular values ≤ this share of the largest are zero: float32 SVDs of rank-deficient
#                   matrices put their null values at ≤ 8·eps·s_max (eps = 1.2e-7); LAPACK's usual size·eps
#                   (2.4e-4 at 2048) would drop real directions (the benchmark's Σ τ_i has s_min = 1.9e-4·s_max)
OVERSAMPLE = 16  # extra random columns of the randomized SVD
POWER_ITERATIONS = 4  # subspace iterations of the randomized SVD: 96% of the optimal energy at k = r/16 even
#                      on a flat (Gaussian) spectrum, where 2 iterations catch 90%
LOWRANK_MAX_SHARE = 1 / 16  # randomized SVD only for k ≤ this share of r: at k = r/4 on the benchmark's task
#                             vectors (a flat spectrum) its rank-k part was 33% off; the Gram route, 7e-6


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
    u_orth = polar(u_cat)  # (m, q), a new tensor
    v_orth = polar(vh_cat.T)  # (n, q)
    del u_cat, vh_cat
    merged = u_orth.mul_(s_cat.to(u_orth.dtype)) @ v_orth.T  # (m, n); in place: one (m, q) buffer fewer
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
    # The task directions lie outside the common subspace, so the concatenated U's Gram matrix is
    # blockdiag(I, Gram of the task U's), and its polar factor is [U_common, polar(task U's)]:
    # an (m, N·per_task) polar factor instead of an (m, r) one, and the same result.
    u_orth = torch.cat([u_common, polar(torch.cat(us[1:], dim=1))], dim=1)  # (m, q)
    v_orth = polar(torch.cat(vhs, dim=0).T)  # (n, q): no such structure on this side
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
def _tolerance(values: torch.Tensor) -> float:
    """Singular values at or below this (NULL_RTOL·s_max) are zero to working precision."""
    if values.numel() == 0:
        return 0.0
    return float(values.max()) * NULL_RTOL


def thin_svd(matrix: torch.Tensor, k: int | None = None, how: str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top k (default: all r = min(m, n)) singular triplets U (m, k), S (k,), Vᵀ (k, n) of a
    float32 matrix, values in descending order, zero ones included.

    ``how``: "svd" (``torch.linalg.svd``) or "gram" (``eigh`` of the smaller side's Gram matrix,
    with the directions whose Gram eigenvalue is below ``GRAM_FLOOR``·max recomputed from their
    own block, see ``_gram_svd``); None picks "svd" at r ≤ ``EXACT_MAX_RANK``.
    """
    rank = min(matrix.shape)
    k = rank if k is None else min(k, rank)
    if how is None:
        how = "svd" if rank <= EXACT_MAX_RANK else "gram"
    if how == "svd":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    if how != "gram":
        raise ValueError(f"unknown SVD route {how!r}")
    tall = matrix.shape[0] >= matrix.shape[1]
    left, values, right = _gram_svd(matrix if tall else matrix.T, k)
    return (left, values, right.T) if tall else (right, values, left.T)


def _gram_svd(side: torch.Tensor, k: int, zero: float | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k thin SVD (left (l, k), values (k,), right (r, k)) of a tall (l, r) float32 matrix.

    ``eigh`` of the (r, r) Gram matrix in float32 gives the right singular vectors; a Gram
    eigenvalue λ carries an absolute error of about eps·λ_max, so the directions with
    λ ≥ GRAM_FLOOR·λ_max are accurate to eps/GRAM_FLOOR and become left = side·v/‖side·v‖.
    The others span the bottom block side·V_b (l, b), whose own Gram matrix is formed from it
    (its values are b-sized, not λ_max-sized): the same step recurses on it, down to
    ``SMALL_BLOCK`` columns, where ``torch.linalg.svd`` finishes. Every level covers three
    decades of λ, so a matrix needs one level (a flat spectrum) to a few (a decaying one).
    ``zero``: the singular value under which everything is zero (set at the top level).
    """
    rows, cols = side.shape
    if cols <= SMALL_BLOCK:
        u, s, vh = torch.linalg.svd(side, full_matrices=False)
        return u[:, :k], s[:k], vh[:k].T
    eigenvalues, eigenvectors = torch.linalg.eigh(side.T @ side)  # ascending, (r,), (r, r)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    largest = float(eigenvalues[0].clamp(min=0))
    if zero is None:
        zero = largest ** 0.5 * NULL_RTOL
    if largest <= zero ** 2:  # the whole block is zero to working precision
        return side.new_zeros(rows, k), side.new_zeros(k), eigenvectors[:, :k]
    accurate = int((eigenvalues >= GRAM_FLOOR * largest).sum())  # ≥ 1: the largest itself
    head = min(k, accurate)
    right = eigenvectors[:, :head]  # (r, head)
    left = side @ right  # (l, head)
    values = torch.linalg.vector_norm(left, dim=0)  # more accurate than sqrt(λ)
    left /= values
    if k > head:  # the rest from the bottom block, with its own (smaller) scale
        bottom = eigenvectors[:, accurate:]  # (r, b)
        block = side @ bottom  # (l, b)
        # V_b leans on the top right vectors by about eps·λ_max/λ_t, which side·V_b turns into
        # eps·λ_max/σ_t along u_t: large beside the small σ_b. The top left vectors are
        # accurate, so project them out (twice: one pass leaves eps of a large component).
        for _ in range(2):
            block -= left @ (left.T @ block)
        bottom_left, bottom_values, bottom_right = _gram_svd(block, k - head, zero)
        left = torch.cat([left, bottom_left], dim=1)
        values = torch.cat([values, bottom_values])
        right = torch.cat([right, bottom @ bottom_right], dim=1)
    return left, values, right  # descending: each level's values lie below the one before


def top_singular(matrix: torch.Tensor, k: int, how: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets (U (m, k'), S (k',), Vᵀ (k', n)) of ``matrix``, without those
    that are zero to working precision (so k' ≤ k).

    ``how``: "svd" (``torch.linalg.svd``), "lowrank" (randomized, approximate) or "gram" (see
    ``thin_svd``); None picks by size: "svd" at r ≤ ``EXACT_MAX_RANK``, "lowrank" for
    k ≤ ``LOWRANK_MAX_SHARE``·r, else "gram".
    """
    rank = min(matrix.shape)
    k = min(k, rank)
    if how is None:
        how = "svd" if rank <= EXACT_MAX_RANK else "lowrank" if k <= rank * LOWRANK_MAX_SHARE else "gram"
    if how == "lowrank":
        u, s, v = torch.svd_lowrank(matrix, q=min(rank, k + OVERSAMPLE), niter=POWER_ITERATIONS)
        u, s, vh = u[:, :k], s[:k], v[:, :k].T
    else:
        u, s, vh = thin_svd(matrix, k, how)
    kept = int((s > _tolerance(s)).sum())
    return u[:, :kept], s[:kept], vh[:kept]


def polar(matrix: torch.Tensor, how: str | None = None) -> torch.Tensor:
    """The orthogonal polar factor of a (p, q) matrix, U Vᵀ from its SVD U S Vᵀ, over its range:
    directions with a zero singular value (to working precision) are left out, so a matrix with
    dependent columns gives a partial isometry instead of an arbitrary completion.

    ``how``: "svd" or "gram" (see ``thin_svd``); None picks by size.
    """
    u, s, vh = thin_svd(matrix, how=how)
    kept = int((s > _tolerance(s)).sum())  # a prefix: s is in descending order
    return u[:, :kept] @ vh[:kept]


def isotropic(matrix: torch.Tensor, how: str | None = None) -> torch.Tensor:
    """mean(S)·U Vᵀ for ``matrix`` = U S Vᵀ: its singular vectors with a flat spectrum (the mean
    is over all min(m, n) values; directions with value zero are left out, see ``polar``).

    ``how``: "svd" or "gram" (see ``thin_svd``); None picks by size. Overwrites nothing.
    """
    u, s, vh = thin_svd(matrix, how=how)
    kept = int((s > _tolerance(s)).sum())  # a prefix: s is in descending order
    if u.shape[0] >= vh.shape[1]:  # scale the smaller factor
        return u[:, :kept] @ (vh[:kept] * s.mean())
    return (u[:, :kept] * s.mean()) @ vh[:kept]


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
