import pytest
import torch
from conftest import mlp

from lightning_ntk.derivatives import gradient, laplacian, partial


def autograd_partial(net, x, *dims):
    x = x.clone().requires_grad_(True)
    out = net(x)
    for d in dims:
        out = torch.autograd.grad(out.sum(), x, create_graph=True)[0][:, d : d + 1]
    return out


def assert_same_parameter_gradients(net, got, want):
    """The gradients of ``Σ got²`` and ``Σ want²`` with respect to ``net``'s parameters agree (or both are unused)."""
    params = list(net.parameters())
    g_got = torch.autograd.grad(got.square().sum(), params, allow_unused=True)
    g_want = torch.autograd.grad(want.square().sum(), params, allow_unused=True)
    for a, b in zip(g_got, g_want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dims", [(), (0,), (1,), (0, 0), (0, 1), (1, 1, 0)])
def test_partial_matches_autograd_values_and_parameter_gradients(dims):
    net = mlp(d_in=2, width=7).double()
    x = torch.rand(9, 2, dtype=torch.float64)
    got, want = partial(net, x, *dims), autograd_partial(net, x, *dims)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert_same_parameter_gradients(net, got, want)


def test_gradient_and_laplacian():
    net = mlp(d_in=3, width=5).double()
    x = torch.rand(4, 3, dtype=torch.float64)
    grad_want = torch.cat([autograd_partial(net, x, j) for j in range(3)], dim=1)
    torch.testing.assert_close(gradient(net, x), grad_want, rtol=1e-10, atol=1e-12)
    lap_want = sum(autograd_partial(net, x, j, j) for j in range(3))
    torch.testing.assert_close(laplacian(net, x), lap_want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(laplacian(net, x, dims=(0, 2)), lap_want - autograd_partial(net, x, 1, 1))


def test_bad_inputs():
    net = mlp()
    with pytest.raises(ValueError, match=r"shape \(N, d\)"):
        partial(net, torch.rand(5), 0)
    with pytest.raises(ValueError, match="out of range"):
        partial(net, torch.rand(5, 1), 1)
    with pytest.raises(ValueError, match="empty"):
        laplacian(net, torch.rand(5, 1), dims=())


def test_partial_under_inference_mode_matches_normal_mode():
    # Validation runs under Trainer(inference_mode=True); the helpers must still give u_xx there.
    net = mlp(d_in=1, width=6).double()
    x = torch.rand(5, 1, dtype=torch.float64)
    want = partial(net, x, 0, 0)
    with torch.inference_mode():
        got = partial(net, x, 0, 0)
        lap = laplacian(net, x)
    torch.testing.assert_close(got, want.detach())
    torch.testing.assert_close(lap, want.detach())


def two_output_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()


@pytest.mark.parametrize("dims", [(0,), (1, 0), (1, 1, 0)])
def test_partial_of_several_outputs_matches_autograd_per_output(dims):
    # Several values per point take nested jvp (reverse mode would need a pass per value).
    net = two_output_mlp()
    x = torch.rand(7, 2, dtype=torch.float64)
    got = partial(net, x, *dims)
    for c in range(2):
        want = autograd_partial(lambda y, c=c: net(y)[:, c : c + 1], x, *dims)
        torch.testing.assert_close(got[:, c : c + 1], want, rtol=1e-10, atol=1e-12)


def test_one_value_per_point_takes_reverse_mode_and_no_zero_tangents():
    # Forward-mode AD gives each parameter a zero tangent whose sums PyTorch sizes in Python (slow on
    # every call); nested reverse mode has none.
    from lightning_ntk.counting import OpCounter

    x = torch.rand(5, 2, dtype=torch.float64)
    with OpCounter() as one:
        partial(mlp(d_in=2, width=7).double(), x, 0, 1)
    with OpCounter() as several:
        partial(two_output_mlp(), x, 0, 1)
    assert one.ops.get("_efficientzerotensor", 0) == 0
    assert several.ops.get("_efficientzerotensor", 0) > 0  # the jvp path, for contrast


def test_a_module_with_several_outputs_is_remembered_and_goes_straight_to_jvp():
    from lightning_ntk.counting import OpCounter
    from lightning_ntk.derivatives import _known_several_values

    net, x = two_output_mlp(), torch.rand(5, 2, dtype=torch.float64)
    with OpCounter() as first:
        partial(net, x, 0, 0)
    assert _known_several_values(net)
    with OpCounter() as second:
        partial(net, x, 0, 0)
    # The first call also began a reverse-mode evaluation (one forward) before it found two values.
    assert sum(second.ops.values()) < sum(first.ops.values())
    assert not _known_several_values(mlp(d_in=2, width=3)) and not _known_several_values(torch.sin)


class FlowFields(torch.nn.Module):
    """Residual code that passes bound methods: ``self.uvp`` (two values per point), ``self.u`` (one)."""

    def __init__(self):
        super().__init__()
        self.net = two_output_mlp()

    def uvp(self, x):
        return self.net(x)

    def u(self, x):
        return self.net(x)[:, :1]


def test_a_bound_method_with_several_outputs_is_remembered_by_its_instance_and_function():
    from lightning_ntk.counting import OpCounter
    from lightning_ntk.derivatives import _known_several_values

    fields, x = FlowFields(), torch.rand(5, 2, dtype=torch.float64)
    with OpCounter() as first:
        partial(fields.uvp, x, 0, 0)
    assert _known_several_values(fields.uvp)  # a new bound-method object, the same instance and function
    with OpCounter() as second:
        partial(fields.uvp, x, 0, 0)
    assert sum(second.ops.values()) < sum(first.ops.values())
    # The instance's one-value method and another instance's method are not taken for it.
    assert not _known_several_values(fields.u) and not _known_several_values(FlowFields().uvp)
    torch.testing.assert_close(partial(fields.u, x, 0, 0), autograd_partial(fields.u, x, 0, 0), rtol=1e-10, atol=1e-12)


def test_partial_of_a_function_linear_in_its_input_is_zero_and_keeps_the_output_shape():
    lin = torch.nn.Linear(2, 1).double()
    x = torch.rand(4, 2, dtype=torch.float64)
    assert partial(lin, x, 0, 1).shape == (4, 1) and partial(lin, x, 0, 1).abs().max() == 0
    torch.testing.assert_close(partial(lin, x, 1), lin.weight[0, 1].expand(4, 1))
    two = torch.full((4,), 2.0, dtype=torch.float64)
    torch.testing.assert_close(partial(lambda y: y.square().sum(1), x, 0, 0), two)


def test_gradient_takes_one_reverse_pass_and_matches_autograd_with_parameter_gradients():
    from lightning_ntk.counting import OpCounter

    net = mlp(d_in=3, width=5).double()
    x = torch.rand(4, 3, dtype=torch.float64)
    with OpCounter() as ops:
        got = gradient(net, x)
    assert ops.ops["tanh"] == 2  # one evaluation of the two tanh layers for all three columns (not three)
    want = torch.cat([autograd_partial(net, x, j) for j in range(3)], dim=1)
    assert_same_parameter_gradients(net, got, want)
    with torch.inference_mode():
        torch.testing.assert_close(gradient(net, x), want.detach())


@pytest.mark.parametrize("helper", ["gradient", "partial", "laplacian"])
def test_residuals_written_with_the_helpers_get_exact_traces_on_the_gram_path(helper):
    # Reverse mode under vmap must keep every parameter use per point, as forward mode did.
    from conftest import reference_point_norms

    from lightning_ntk.jacobian.dispatch import per_point_squared_norms

    class Eikonal(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = mlp(d_in=2, width=6).double()

        def residuals(self, x):
            if helper == "gradient":
                r = gradient(self.net, x).square().sum(1, keepdim=True) - 1
            elif helper == "partial":
                r = partial(self.net, x, 0, 1) + partial(self.net, x, 1)
            else:
                r = laplacian(self.net, x)
            return {"pde": r, "bc": self.net(x[:3])}

    model, x = Eikonal(), torch.rand(7, 2, dtype=torch.float64)
    got = per_point_squared_norms(model, x, paths=("gram",))
    want = reference_point_norms(model, x)
    for name in want:
        torch.testing.assert_close(got.norms[name], want[name], rtol=1e-10, atol=1e-12)


def test_laplacian_evaluates_the_network_once_and_keeps_several_outputs_on_jvp():
    from lightning_ntk.counting import OpCounter

    net = mlp(d_in=3, width=5).double()
    x = torch.rand(4, 3, dtype=torch.float64)
    with OpCounter() as ops:
        got = laplacian(net, x, dims=(0, 2))
    assert ops.ops["tanh"] == 2  # one evaluation of the two tanh layers, not one per dimension
    want = autograd_partial(net, x, 0, 0) + autograd_partial(net, x, 2, 2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert_same_parameter_gradients(net, got, want)
    two = two_output_mlp()
    y = torch.rand(5, 2, dtype=torch.float64)
    for c in range(2):
        want = sum(autograd_partial(lambda z, c=c: two(z)[:, c : c + 1], y, j, j) for j in range(2))
        torch.testing.assert_close(laplacian(two, y)[:, c : c + 1], want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        laplacian(net, x, dims=(3,))
