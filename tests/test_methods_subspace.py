"""TSV-M, Iso-C and Iso-CTS: hand-computed cases, properties, the fast SVD routes against the
exact one, and end-to-end merges of tiny Llamas loaded back with transformers."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import mergelab
from mergelab.io import CheckpointReader
from mergelab.methods import METHODS
from mergelab.methods import subspace
from mergelab.methods.subspace import common_split, isotropic, polar, thin_svd, top_singular

SUBSPACE = ("tsv", "iso_c", "iso_cts")


def merge(method: str, task_vectors: list[torch.Tensor], base: torch.Tensor | None = None, **params):
    """Merge experts θ_i = base + τ_i with a registered method (the method may overwrite its inputs)."""
    base = torch.zeros_like(task_vectors[0]) if base is None else base
    return METHODS[method]([base + tv for tv in task_vectors], base, **params)


def orthonormal(n: int, seed: int) -> torch.Tensor:
    """A random n×n orthogonal matrix."""
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]


def decaying(m: int, n: int, seed: int, rate: float = 0.8) -> torch.Tensor:
    """An m×n float32 matrix with singular values rate**i (random singular vectors)."""
    r = min(m, n)
    values = rate ** torch.arange(r, dtype=torch.float64)
    return (orthonormal(m, seed)[:, :r] * values @ orthonormal(n, seed + 1)[:, :r].T).float()


# -- hand-computed cases ------------------------------------------------------------------------
def test_iso_c_flattens_the_spectrum_of_the_summed_task_matrices():
    # Σ τ_i = diag(3, 1): singular values 3 and 1 become their mean 2, then alpha scales
    tau = [torch.tensor([[3.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])]
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.allclose(merge("iso_c", tau, base, alpha=1.0), base + torch.diag(torch.tensor([2.0, 2.0])))
    assert torch.allclose(merge("iso_c", tau, base, alpha=0.5), base + torch.eye(2))


def test_tsv_keeps_each_tasks_top_singular_triplet():
    # N = 2, r = 2: each task keeps int(2/2) = 1 triplet. τ_1's second direction (value 1) is dropped;
    # τ_2's top direction e2 (value 2) is orthogonal to e1, so Δ = diag(3, 2).
    tau = [torch.tensor([[3.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])]
    assert torch.allclose(merge("tsv", tau), torch.diag(torch.tensor([3.0, 2.0])))
    assert torch.allclose(merge("tsv", tau, alpha=2.0), torch.diag(torch.tensor([6.0, 4.0])))


def test_iso_cts_adds_task_directions_outside_the_common_one():
    # r = 3, N = 2, common_fraction 1/3: one common direction and one per task.
    # Σ τ_i = diag(4, 0, 3): common direction e1 (value 4); τ_1 off it is diag(0, 2, 0) (e2, value 2),
    # τ_2 off it is diag(0, -2, 3) (e3, value 3); U = V = [e1 e2 e3] and the spectrum is (4+2+3)/3 = 3.
    tau = [torch.diag(torch.tensor([4.0, 2.0, 0.0])), torch.diag(torch.tensor([0.0, -2.0, 3.0]))]
    assert common_split(3, 2, 1 / 3) == (1, 1)
    assert torch.allclose(merge("iso_cts", tau, common_fraction=1 / 3), 3.0 * torch.eye(3))
    # Iso-C of the same sum: values (4, 3, 0) → mean 7/3 on e1 and e3; the null direction e2 stays empty
    assert torch.allclose(merge("iso_c", tau), torch.diag(torch.tensor([7 / 3, 0.0, 7 / 3])))


@pytest.mark.parametrize("how", ["svd", "gram"])
def test_polar_factor_of_a_shear_is_the_nearest_rotation(how):
    # M = [[1, 1], [0, 1]] (det 1): its polar factor is (M + cof M)/|…| = [[2, 1], [-1, 2]]/√5
    shear = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    expected = torch.tensor([[2.0, 1.0], [-1.0, 2.0]]) / math.sqrt(5.0)
    assert torch.allclose(polar(shear, how), expected, atol=1e-6)


def test_common_split_makes_the_rest_divisible_by_the_number_of_tasks():
    assert common_split(2048, 4, 0.8) == (1640, 102)  # int(1638.4) = 1638, round(410/4) = 102 (as the reference)
    assert common_split(10, 3, 0.8) == (7, 1)  # 8 common, round(2/3) = 1 per task: the common part shrinks
    assert common_split(10, 3, 0.9) == (10, 0)  # round(1/3) = 0: all common, which is Iso-C
    assert common_split(3, 2, 0.0) == (1, 1)  # round(1.5) = 2 would need 4 > 3 directions: capped at 3 // 2
    for rank, tasks, share in [(64, 3, 0.5), (100, 8, 0.8), (7, 7, 0.0)]:
        common, per_task = common_split(rank, tasks, share)
        assert common >= 0 and common + tasks * per_task == rank


# -- properties ---------------------------------------------------------------------------------
def test_iso_c_of_one_task_keeps_its_singular_vectors_with_a_flat_spectrum():
    tau = decaying(7, 5, seed=3)
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    merged = merge("iso_c", [tau])
    assert torch.allclose(merged, s.mean() * u @ vh, atol=1e-6)
    assert torch.allclose(torch.linalg.svdvals(merged), s.mean().expand(5), atol=1e-6)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_tsv_of_tasks_in_orthogonal_subspaces_is_task_arithmetic(fraction):
    # Rank-2 task matrices in mutually orthogonal column and row spaces: every triplet is kept
    # (k = 4 ≥ rank 2 at fraction 1/N; the zero ones are left out), the concatenated U and V are
    # already orthonormal, so Δ = Σ τ_i.
    left, right = orthonormal(8, 0).float(), orthonormal(8, 1).float()
    tau = [left[:, 2 * i:2 * i + 2] @ torch.diag(torch.tensor([3.0 - i, 1.0 + i])) @ right[:, 2 * i:2 * i + 2].T
           for i in range(2)]
    assert torch.allclose(merge("tsv", tau, fraction=fraction), tau[0] + tau[1], atol=1e-5)


def test_tsv_of_identical_experts_is_their_truncated_task_vector():
    # Duplicated directions make the concatenated U singular: the polar factor over its range
    # splits each direction between the copies, which rebuilds the task's own top-k part.
    tau = decaying(6, 6, seed=5)
    u, s, vh = torch.linalg.svd(tau)
    assert torch.allclose(merge("tsv", [tau, tau]), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5)


@pytest.mark.parametrize("method", SUBSPACE)
def test_the_order_of_the_experts_does_not_matter(method):
    tau = [decaying(9, 6, seed=s, rate=0.7) for s in (10, 20, 30)]
    params = {"common_fraction": 0.5} if method == "iso_cts" else {}  # 3 common + 1 per task
    assert torch.allclose(merge(method, tau, **params), merge(method, tau[::-1], **params), atol=1e-5)


def test_iso_cts_is_the_papers_formula_with_both_concatenations_orthogonalized():
    # The reference (float64, full SVDs): common top-k of Σ τ_i, each τ_i's top directions off
    # it, both concatenations replaced by their polar factors, spectrum flattened to the mean.
    # The method orthogonalizes only the task U's (they are orthogonal to the common ones).
    tau = [decaying(12, 10, seed=s, rate=0.75) for s in (40, 50, 60)]
    common, per_task = common_split(10, 3, 0.4)  # 4 common + 2 per task

    def polar64(matrix):
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u @ vh

    u, s, vh = torch.linalg.svd(sum(tau).double(), full_matrices=False)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    for task in tau:
        outside = task.double() - u[:, :common] @ (u[:, :common].T @ task.double())
        tu, ts, tvh = torch.linalg.svd(outside, full_matrices=False)
        us, ss, vhs = us + [tu[:, :per_task]], ss + [ts[:per_task]], vhs + [tvh[:per_task]]
    expected = torch.cat(ss).mean() * polar64(torch.cat(us, dim=1)) @ polar64(torch.cat(vhs).T).T
    assert torch.allclose(merge("iso_cts", tau, common_fraction=0.4).double(), expected, atol=1e-5)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    tau = [decaying(8, 6, seed=s) + 0.1 * decaying(8, 6, seed=s + 7, rate=0.95) for s in (1, 2, 3)]
    assert torch.allclose(merge("iso_cts", tau, common_fraction=1.0), merge("iso_c", tau), atol=1e-6)


@pytest.mark.parametrize("method", SUBSPACE)
def test_tensors_that_are_not_matrices_get_the_mean_task_vector(method):
    base = torch.tensor([1.0, -1.0, 0.5])
    tau = [torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 4.0, -1.0])]
    assert torch.allclose(merge(method, tau, base, alpha=1.0), base + torch.tensor([1.0, 2.0, 0.0]))
    assert torch.allclose(merge(method, tau, base, alpha=0.5), base + torch.tensor([0.5, 1.0, 0.0]))


@pytest.mark.parametrize("method", SUBSPACE)
def test_the_base_is_never_touched_and_the_experts_are_released(method):
    base = decaying(6, 4, seed=1)
    experts = [base + decaying(6, 4, seed=s) for s in (2, 3)]
    kept = base.clone()
    METHODS[method](experts, base)
    assert torch.equal(base, kept)
    assert experts == [None, None]


# -- the fast routes against the exact one ------------------------------------------------------
@pytest.fixture
def gram_all_the_way(monkeypatch):
    """The Gram route on blocks of any width (by default blocks of ≤ 64 columns go to
    torch.linalg.svd, which would hide the route on these small matrices)."""
    monkeypatch.setattr(subspace, "SMALL_BLOCK", 1)


def exact_isotropic(matrix: torch.Tensor) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return s.mean() * u @ vh


@pytest.mark.parametrize("how", ["lowrank", "gram"])
def test_fast_top_singular_triplets_agree_with_the_exact_svd(how, gram_all_the_way):
    matrix = decaying(120, 90, seed=4)
    exact_u, exact_s, exact_vh = top_singular(matrix, 10, "svd")
    u, s, vh = top_singular(matrix, 10, how)
    assert torch.allclose(s, exact_s, rtol=1e-4)
    assert torch.allclose((u * s) @ vh, (exact_u * exact_s) @ exact_vh, atol=1e-4)
    assert torch.allclose(u.T @ u, torch.eye(10), atol=1e-4)


def test_the_gram_routes_agree_with_the_exact_svd(gram_all_the_way):
    matrix = decaying(50, 80, seed=6, rate=0.9)  # singular values 1 … 0.9**49 ≈ 0.006
    assert torch.allclose(isotropic(matrix, "gram"), isotropic(matrix, "svd"), atol=1e-4)
    assert torch.allclose(isotropic(matrix.T, "gram"), isotropic(matrix.T, "svd"), atol=1e-4)
    assert torch.allclose(polar(matrix.T, "gram"), polar(matrix.T, "svd"), atol=1e-4)


def test_the_gram_route_keeps_a_spectrum_of_eight_decades_of_eigenvalues(gram_all_the_way, monkeypatch):
    # Singular values 1 … 1e-4: Gram eigenvalues 1 … 1e-8, below float32's eps beside the largest.
    # Each level trusts three decades of eigenvalues and recomputes the rest from its own block.
    m, n = 160, 120
    values = 10.0 ** torch.linspace(0, -4, n, dtype=torch.float64)
    matrix = (orthonormal(m, 7)[:, :n] * values @ orthonormal(n, 8).T).float()
    eigh_calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda gram: eigh_calls.append(gram.shape[0]) or eigh(gram))
    u, s, vh = thin_svd(matrix, how="gram")
    assert len(eigh_calls) >= 3 and eigh_calls == sorted(eigh_calls, reverse=True)  # 120 columns, then fewer
    assert torch.allclose(s.double(), values, rtol=1e-3)  # the smallest, 1e-4, to 0.1%
    assert torch.allclose(u.T @ u, torch.eye(n), atol=1e-4)
    assert torch.allclose(vh @ vh.T, torch.eye(n), atol=1e-4)
    iso = isotropic(matrix, "gram").double()
    assert (iso - exact_isotropic(matrix)).norm() / iso.norm() < 1e-4
    # a plain float32 eigh of the Gram matrix loses the bottom directions: what the levels are for
    eigenvalues, eigenvectors = eigh(matrix.T @ matrix)
    plain = matrix @ eigenvectors @ torch.diag(eigenvalues.clamp(min=1e-30) ** -0.5) @ eigenvectors.T * values.mean()
    assert (plain.double() - exact_isotropic(matrix)).norm() / iso.norm() > 1e-2


def test_randomized_top_triplets_of_low_rank_plus_noise_are_close_to_the_exact_ones():
    # What task matrices look like: a few strong directions over small dense noise. The
    # randomized SVD (auto-picked for k ≤ r/16 above EXACT_MAX_RANK) captures the top k.
    generator = torch.Generator().manual_seed(3)
    m, n, k = 700, 600, 12
    strong = orthonormal(m, 11)[:, :k] * torch.linspace(10, 2, k, dtype=torch.float64) @ orthonormal(n, 12)[:, :k].T
    matrix = (strong + 1e-3 * torch.randn(m, n, generator=generator, dtype=torch.float64)).float()
    u, s, vh = top_singular(matrix, k, "lowrank")
    exact_u, exact_s, exact_vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    exact_part = (exact_u[:, :k] * exact_s[:k]) @ exact_vh[:k]
    assert ((u * s) @ vh - exact_part).norm() / exact_part.norm() < 1e-4
    assert torch.allclose(s.double(), exact_s[:k], rtol=1e-4)
    big = torch.zeros(subspace.EXACT_MAX_RANK + 1, subspace.EXACT_MAX_RANK + 1)
    assert top_singular(big, 1)[1].numel() == 0  # auto route at this size: lowrank, and zeros are dropped


@pytest.mark.parametrize("how", ["svd", "gram"])
def test_rank_deficient_matrices_do_not_blow_up(how, gram_all_the_way):
    # A rank-1 sum: the null directions get no weight (no division by ~0 eigenvalues)
    u, v = torch.zeros(40), torch.zeros(30)
    u[3], v[7] = 1.0, 1.0
    rank_one = 6.0 * torch.outer(u, v)
    expected = 6.0 / 30 * torch.outer(u, v)  # mean of the 30 singular values (6, 0, …, 0)
    assert torch.allclose(isotropic(rank_one, how), expected, atol=1e-6)
    # three dependent columns u·(1, 1, 2): the polar factor over the range is u·(1, 1, 2)/√6
    expected_polar = torch.outer(u, torch.tensor([1.0, 1.0, 2.0]) / math.sqrt(6.0))
    assert torch.allclose(polar(torch.stack([u, u, 2 * u], dim=1), how), expected_polar, atol=1e-6)
    assert torch.isfinite(isotropic(torch.zeros(40, 30), how)).all()


def test_a_full_rank_matrix_keeps_its_smallest_direction():
    # s_min = 1e-4·s_max is below LAPACK's usual rank tolerance (size·eps ≈ 2.4e-4 at 2048) but a
    # real direction: Iso-C gives it mean(S) like every other one
    values = torch.tensor([1.0, 0.5, 0.25, 1e-4], dtype=torch.float64)
    matrix = (orthonormal(6, 2)[:, :4] * values @ orthonormal(4, 3).T).float()
    for how in ("svd", "gram"):
        assert torch.allclose(torch.linalg.svdvals(isotropic(matrix, how)), values.mean().float().expand(4), rtol=1e-3)


# -- end to end ---------------------------------------------------------------------------------
def state(path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    return {name: reader.get(name) for name in reader.tensors}


@pytest.mark.parametrize("method", SUBSPACE)
def test_merging_tiny_llamas_matches_the_method_and_loads(method, world, tmp_path, one_thread, caplog):
    config = {"merge_method": method, "base_model": world["base"],
              "models": [{"model": world[name]} for name in "abc"], "dtype": "float32"}
    with caplog.at_level(logging.WARNING, logger="mergelab"):
        out = mergelab.merge(config, tmp_path / "out", quiet=True)
    assert f"{method} note: " in caplog.text and "not 2-D" in caplog.text  # the note on norms, not a mergekit difference
    assert "differs from mergekit" not in caplog.text
    merged, base = state(out), state(world["base"])
    experts = [state(world[name]) for name in "abc"]
    for name, tensor in merged.items():
        expected = METHODS[method]([e[name].float().clone() for e in experts], base[name].float())
        assert torch.allclose(tensor.float(), expected, atol=1e-5), name
    norm = next(name for name in merged if merged[name].dim() == 1)
    mean_task_vector = (experts[0][norm] + experts[1][norm] + experts[2][norm] - 3 * base[norm]) / 3
    assert torch.allclose(merged[norm], base[norm] + mean_task_vector, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 6, 7]])).logits).all()
