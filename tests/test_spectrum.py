import pytest
import torch
from conftest import AutogradPoisson, HelperPoisson, TwoFieldModel, poisson_batch

from lightning_ntk import ntk_traces
from lightning_ntk.spectrum import block_spectra, lanczos_top_k, ntk_eigenvalues, ntk_matrix


def hand_built_jacobian(model, batch):
    """J from one torch.autograd.grad per residual row, stacked over all terms."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model.residuals(batch)
    rows = []
    for r in out.values():
        for x in r.reshape(-1):
            grads = torch.autograd.grad(x, params, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params, strict=True)]
                )
            )
    return torch.stack(rows).detach()


@pytest.mark.parametrize("cls", [HelperPoisson, AutogradPoisson])
def test_ntk_matrix_equals_hand_built_and_is_symmetric_psd(cls):
    model = cls().double()
    batch = poisson_batch(n_r=9)
    K, index = ntk_matrix(model, batch)
    J = hand_built_jacobian(model, poisson_batch(n_r=9))
    torch.testing.assert_close(K, J @ J.T, rtol=1e-10, atol=1e-12)
    assert index == {"bc": slice(0, 2), "pde": slice(2, 11)}
    torch.testing.assert_close(K, K.T, rtol=0, atol=0)
    assert float(torch.linalg.eigvalsh(K).min()) > -1e-9 * float(K.diagonal().max())
    traces = ntk_traces(model, batch)
    for name, rows in index.items():
        torch.testing.assert_close(K[rows, rows].trace(), traces[name], rtol=1e-10, atol=0)


def test_eigenvalues_exact_against_eigvalsh_of_hand_built_block():
    model = TwoFieldModel().double()
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(4, 2, generator=g, dtype=torch.float64), torch.rand(7, 2, generator=g, dtype=torch.float64))
    J = hand_built_jacobian(model, batch)
    K = J @ J.T
    for term, rows in (("data", slice(0, 8)), ("pde", slice(8, 22)), (None, slice(0, 22))):
        want = torch.linalg.eigvalsh(K[rows, rows]).flip(0)[:3]
        spec = ntk_eigenvalues(model, batch, k=3, term=term, method="exact")
        torch.testing.assert_close(spec.eigenvalues, want, rtol=1e-10, atol=1e-10)
        block_trace = K[rows, rows].trace()
        torch.testing.assert_close(spec.trace, block_trace, rtol=1e-10, atol=0)
        torch.testing.assert_close(spec.effective_rank, block_trace / want[0], rtol=1e-10, atol=0)
        torch.testing.assert_close(spec.condition_ratio, want[0] / want[2], rtol=1e-8, atol=0)
        torch.testing.assert_close(spec.top_k_fraction, want.sum() / block_trace, rtol=1e-10, atol=0)


@pytest.mark.parametrize("cls", [HelperPoisson, AutogradPoisson])
def test_lanczos_matches_exact_on_a_larger_block(cls):
    model = cls(width=16).double()
    batch = poisson_batch(n_r=150)
    exact = ntk_eigenvalues(model, batch, k=5, term="pde", method="exact")
    g = torch.Generator().manual_seed(0)
    lanczos = ntk_eigenvalues(model, batch, k=5, term="pde", method="lanczos", generator=g)
    assert lanczos.method == "lanczos"
    torch.testing.assert_close(lanczos.eigenvalues[:3], exact.eigenvalues[:3], rtol=1e-6, atol=0)
    torch.testing.assert_close(lanczos.trace, exact.trace, rtol=1e-10, atol=0)
    full = ntk_eigenvalues(model, batch, k=3, method="lanczos", generator=g)
    torch.testing.assert_close(full.eigenvalues, ntk_eigenvalues(model, batch, k=3).eigenvalues, rtol=1e-6, atol=0)


def test_lanczos_on_a_known_operator():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64))
    evals = torch.logspace(3, -6, 60, dtype=torch.float64)
    A = q @ torch.diag(evals) @ q.T
    got = lanczos_top_k(lambda v: A @ v, 60, 6, dtype=torch.float64)
    torch.testing.assert_close(got, evals[:6], rtol=1e-9, atol=0)


def test_memory_limit_and_bad_arguments():
    model = HelperPoisson()
    batch = poisson_batch(dtype=torch.float32)
    with pytest.raises(MemoryError, match=r"needs about .* MiB .* over the limit"):
        ntk_matrix(model, batch, max_bytes=100)
    with pytest.raises(ValueError, match="Unknown term 'ic'"):
        ntk_eigenvalues(model, batch, term="ic")
    with pytest.raises(ValueError, match="`k` must be between 1 and the number of rows"):
        ntk_eigenvalues(model, batch, k=100)
    with pytest.raises(ValueError, match="Unknown method"):
        ntk_eigenvalues(model, batch, method="svd")


def test_lanczos_pads_with_zeros_when_the_rank_is_below_k():
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    A = v.T @ v  # rank one, eigenvalue 30
    got = lanczos_top_k(lambda x: A @ x, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor([30.0, 0.0, 0.0], dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["exact", "lanczos"])
def test_block_spectra_equal_eigvalsh_of_each_hand_built_block_with_k_capped(method):
    model = TwoFieldModel().double()
    g = torch.Generator().manual_seed(1)
    batch = (torch.rand(2, 2, generator=g, dtype=torch.float64), torch.rand(9, 2, generator=g, dtype=torch.float64))
    J = hand_built_jacobian(model, batch)
    K = J @ J.T
    spectra = block_spectra(model, batch, k=5, method=method, generator=torch.Generator().manual_seed(0))
    assert list(spectra) == ["data", "pde"]
    for term, rows in (("data", slice(0, 4)), ("pde", slice(4, 22))):
        block = K[rows, rows]
        k = min(5, block.shape[0])
        want = torch.linalg.eigvalsh(block).flip(0)[:k].clamp_min(0)
        assert spectra[term].eigenvalues.shape == (k,)
        torch.testing.assert_close(spectra[term].eigenvalues, want, rtol=1e-6, atol=1e-9 * float(want[0]))
        torch.testing.assert_close(spectra[term].trace, block.trace(), rtol=1e-10, atol=0)
        assert spectra[term].method == method
    with pytest.raises(ValueError, match="`k` must be a positive int"):
        block_spectra(model, batch, k=0)
