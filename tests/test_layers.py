"""GivensLinear against the float64 dense reference: forward, dtypes, merge/unmerge, penalty."""

import math
import warnings

import pytest
import torch
from torch import nn

import goft
from goft import GivensLinear, GOFTConfig
from goft.reference import dense_transform, rotate_dense_ref

from tiny_models import max_rel, transformers

CONFIGS = {
    "strict": GOFTConfig(),
    "strict_raw": GOFTConfig(angle_parameterisation="raw"),
    "scale": GOFTConfig(scale=True),
    "quasi": GOFTConfig(variant="qgoft"),
}


def _randomise(layer: GivensLinear, name: str = "default", std: float = 0.5) -> None:
    with torch.no_grad():
        for param in layer.adapter_parameters(name).values():
            param.add_(torch.randn_like(param) * std)


def _dense_T(layer: GivensLinear, name: str = "default") -> torch.Tensor:
    """T from the layer's raw parameters, written independently of GivensLinear.transform."""
    config = layer.adapter_configs[name]
    p = layer.adapter_parameters(name)
    if config.is_quasi:
        return dense_transform(p["goft_blocks"].detach(), layer.in_features)
    angles = p["goft_angles"].detach().double()
    if config.angle_parameterisation == "tanh":
        angles = math.pi * torch.tanh(angles)
    scale = p["goft_scale"].detach() if "goft_scale" in p else None
    return dense_transform(angles, layer.in_features, scale)


@pytest.mark.parametrize("weight_side", [False, True])
def test_tanh_parameterisation_adds_no_autograd_nodes(weight_side, monkeypatch):
    # The op maps p to pi * tanh(p) itself, so the angles parameter feeds goft's own node directly:
    # no tanh or mul nodes, whose host time per step exceeds the op's at small batches
    # (bench/host_bench.py). The gradient still matches the mapped dense reference.
    monkeypatch.setattr(goft.layers, "WEIGHT_SIDE", weight_side)
    layer = GivensLinear(nn.Linear(8, 4))
    layer.add_adapter("default", GOFTConfig())
    layer.set_adapter("default")
    _randomise(layer)
    angles = layer.goft_angles["default"]
    x = torch.randn(3, 8, dtype=torch.float32)
    y = layer(x)
    parents, stack, seen = [], [y.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None and getattr(child, "variable", None) is angles:
                parents.append(node.name())
            stack.append(child)
    op = "RotatedLinearFunction" if weight_side else "RotateFunction"
    assert len(parents) == 1 and op in parents[0], parents
    probe = torch.randn(y.shape)
    (got,) = torch.autograd.grad(y, angles, probe)
    p64 = angles.detach().double().requires_grad_()
    w = layer.base_layer.weight.double()
    y64 = torch.nn.functional.linear(x.double() @ dense_transform(math.pi * torch.tanh(p64), 8), w)
    (want,) = torch.autograd.grad(y64, p64, probe.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


class Int8Linear(nn.Module):
    """Stand-in for a quantized linear: in_features and an integer weight, no float weight to merge into."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8))
        self.register_buffer("weight_scale", torch.full((out_features, 1), 0.01))

    def forward(self, x):
        return x @ (self.weight.float() * self.weight_scale).T


def _base(kind: str, d: int, out: int = 5) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d, out)
    if kind == "conv1d":
        return transformers.pytorch_utils.Conv1D(out, d)
    return Int8Linear(d, out)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "int8"])
@pytest.mark.parametrize("variant", list(CONFIGS))
@pytest.mark.parametrize("d", [1, 7, 16])
def test_forward_matches_dense_reference(kind, variant, d):
    base = _base(kind, d)
    if kind == "conv1d":
        nn.init.normal_(base.weight)
    layer = GivensLinear(base)
    layer.add_adapter("default", CONFIGS[variant])
    layer.set_adapter("default")
    x = torch.randn(3, 4, d)
    assert torch.equal(layer(x), base(x)), "identity at initialisation"
    _randomise(layer)
    expected = base((x.double() @ _dense_T(layer)).float())
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_parameters_are_float32_and_prefixed_even_for_bf16_base():
    layer = GivensLinear(nn.Linear(8, 3).to(torch.bfloat16))
    for config in CONFIGS.values():
        layer.add_adapter(f"a{len(layer.adapter_names)}", config)
    names = [n for n, _ in layer.named_parameters() if not n.startswith("base_layer.")]
    assert names and all(n.startswith("goft_") for n in names)
    assert all(p.dtype == torch.float32 for n, p in layer.named_parameters() if n in names)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters() if n in names}
    assert shapes["goft_angles.a0"] == (7,) and shapes["goft_blocks.a3"] == (7, 2, 2) and shapes["goft_scale.a2"] == (8,)


def test_bf16_base_weights_and_autocast():
    torch.manual_seed(0)
    base = nn.Linear(16, 4)
    layer = GivensLinear(base)
    layer.add_adapter("default", GOFTConfig(scale=True))
    layer.set_adapter("default")
    _randomise(layer, std=0.2)
    x = torch.randn(8, 16)
    expected = base((x.double() @ _dense_T(layer)).float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    # bfloat16 rounding of x, weight and output (unit roundoff 3.9e-3): about 2e-3 seen.
    torch.testing.assert_close(y.float(), expected, rtol=8e-3, atol=8e-3)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.adapter_parameters("default").values())

    layer.to(torch.bfloat16)  # a model cast after injection: the adapter is cast back to float32 in forward
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=8e-3, atol=8e-3)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_merge_matches_spec_and_unmerge_restores(kind, variant):
    d = 24
    base = _base(kind, d, out=10)
    nn.init.normal_(base.weight)
    layer = GivensLinear(base)
    layer.add_adapter("default", CONFIGS[variant])
    layer.set_adapter("default")
    _randomise(layer, std=0.3)
    x = torch.randn(6, d)
    y = layer(x)
    W0 = base.weight.detach().clone()
    T = _dense_T(layer)
    assert layer.merge()
    # Spec section 5: W <- W @ T.T for (out, in) weights, W <- T @ W for Conv1D's (in, out).
    expected = T @ W0.double() if kind == "conv1d" else W0.double() @ T.T
    assert max_rel(base.weight, expected) < 1e-6
    assert max_rel(layer(x), y) < 1e-5
    assert layer.unmerge() == ["default"]
    assert max_rel(base.weight, W0) < 1e-6
    assert torch.equal(layer(x), y) or max_rel(layer(x), y) < 1e-6


def test_merge_twice_warns_and_applies_once():
    layer = GivensLinear(nn.Linear(8, 8))
    layer.add_adapter("default", GOFTConfig())
    layer.set_adapter("default")
    _randomise(layer)
    layer.merge()
    merged = layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        assert not layer.merge()
    assert torch.equal(layer.weight, merged)
    assert layer.unmerge() == ["default"] and layer.unmerge() == []


def test_unmerge_uses_the_transform_that_was_merged():
    # Training after a merge changes the parameters; unmerge must still undo what was applied.
    layer = GivensLinear(nn.Linear(8, 4))
    layer.add_adapter("default", GOFTConfig(variant="qgoft"))
    layer.set_adapter("default")
    _randomise(layer, std=0.2)
    W0 = layer.weight.detach().clone()
    layer.merge()
    _randomise(layer, std=0.2)
    layer.unmerge()
    assert max_rel(layer.weight, W0) < 1e-6


def test_merge_bf16_weight_casts_once_from_float32():
    base = nn.Linear(32, 8)
    nn.init.normal_(base.weight)
    base.to(torch.bfloat16)
    layer = GivensLinear(base)
    layer.add_adapter("default", GOFTConfig(scale=True))
    layer.set_adapter("default")
    _randomise(layer, std=0.3)
    W0 = base.weight.detach().clone()
    params, scale, angle_parameterisation = layer.op_arguments("default")
    expected = goft.rotate(W0.float(), params.detach(), scale.detach(), True, angle_parameterisation)
    expected = expected.to(torch.bfloat16)
    layer.merge()
    assert base.weight.dtype == torch.bfloat16
    assert torch.equal(base.weight, expected)
    layer.unmerge()
    assert max_rel(base.weight, W0) < 2e-2  # two bf16 roundings


def test_merge_into_quantized_layer_is_a_clear_error():
    layer = GivensLinear(Int8Linear(8, 4))
    layer.add_adapter("default", GOFTConfig())
    layer.set_adapter("default")
    with pytest.raises(NotImplementedError, match="cannot merge into Int8Linear"):
        layer.merge()
    assert layer.merged_adapters == []


def test_unmerge_refuses_a_non_invertible_transform():
    layer = GivensLinear(nn.Linear(4, 4))
    layer.add_adapter("default", GOFTConfig(variant="qgoft"))
    layer.set_adapter("default")
    with torch.no_grad():
        layer.goft_blocks["default"][1] = torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    layer.merge()
    with pytest.raises(ValueError, match="singular"):
        layer.unmerge()


def test_only_the_active_adapter_is_applied_and_trainable():
    base = nn.Linear(8, 3)
    layer = GivensLinear(base)
    layer.add_adapter("a", GOFTConfig())
    layer.add_adapter("b", GOFTConfig(variant="qgoft"))
    _randomise(layer, "a")
    _randomise(layer, "b")
    x = torch.randn(2, 8)
    assert torch.equal(layer(x), base(x)), "no active adapter: the base layer"
    for name in ("a", "b"):
        layer.set_adapter(name)
        torch.testing.assert_close(layer(x), base((x.double() @ _dense_T(layer, name)).float()), rtol=1e-5, atol=1e-5)
        trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
        assert trainable == {n for n, _ in layer.named_parameters() if n.endswith("." + name)}
    layer.disabled = True
    assert torch.equal(layer(x), base(x))
    layer.disabled = False
    layer.delete_adapter("b")
    assert layer.adapter_names == ["a"] and layer.active_adapter is None and "b" not in layer.goft_blocks
    # A merged adapter lives on in the weight: deleting it would lose the only way back.
    weight = base.weight.detach().clone()
    layer.set_adapter("a")
    layer.merge("a")
    with pytest.raises(ValueError, match="adapter 'a' is merged; unmerge it first"):
        layer.delete_adapter("a")
    assert layer.adapter_names == ["a"] and layer.unmerge() == ["a"]
    torch.testing.assert_close(base.weight, weight)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("a", GOFTConfig())


def test_orthogonality_penalty_value_and_gradient():
    layer = GivensLinear(nn.Linear(6, 2))
    layer.add_adapter("q", GOFTConfig(variant="qgoft", orth_lambda=0.5))
    layer.add_adapter("s", GOFTConfig())
    layer.set_adapter("q")
    assert layer.orthogonality_penalty().item() == 0.0, "identity blocks are orthogonal"
    _randomise(layer, "q")
    A = layer.goft_blocks["q"].detach().double()
    expected = 0.5 * sum(float(A[i, :, 0] @ A[i, :, 1]) ** 2 for i in range(A.shape[0]))
    penalty = layer.orthogonality_penalty()
    assert penalty.item() == pytest.approx(expected, rel=1e-5)
    penalty.backward()
    assert layer.goft_blocks["q"].grad.abs().sum() > 0
    layer.set_adapter("s")
    assert layer.orthogonality_penalty() is None


def test_unadaptable_module_is_a_type_error():
    with pytest.raises(TypeError, match="cannot adapt Embedding"):
        GivensLinear(nn.Embedding(4, 4))


def test_pass_through_attributes():
    base = nn.Linear(8, 3)
    layer = GivensLinear(base)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features) == (8, 3)
    conv = GivensLinear(transformers.pytorch_utils.Conv1D(5, 8))
    assert (conv.in_features, conv.out_features) == (8, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        repr(layer)


# ---- the weight-side forward (goft.layers.WEIGHT_SIDE: rotated_linear instead of rotate) ----


@pytest.fixture
def rotated_linear_calls(monkeypatch):
    """Counts GivensLinear's calls of rotated_linear."""
    calls = []
    real = goft.layers.rotated_linear

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(goft.layers, "rotated_linear", counting)
    return calls


def _adapted(base: nn.Module, variant: str) -> GivensLinear:
    layer = GivensLinear(base)
    layer.add_adapter("default", CONFIGS[variant])
    layer.set_adapter("default")
    _randomise(layer)
    return layer


def _adapted_reference(layer: GivensLinear, x: torch.Tensor) -> torch.Tensor:
    """F.linear of the dense float64 reference rotation of x: the layer's output for a plain base."""
    angles, scale = layer.transform("default")
    rotated = rotate_dense_ref(x.double(), angles.double(), None if scale is None else scale.double())
    return nn.functional.linear(rotated, layer.base_layer.weight.double(), layer.base_layer.bias.double()).to(x.dtype)


def _step(layer: GivensLinear, x: torch.Tensor):
    """Output and the gradients of x and the adapter's parameters for a fixed probe."""
    x = x.detach().clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    (y * probe).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in layer.adapter_parameters("default").values()]


@pytest.mark.parametrize("variant", list(CONFIGS))
@pytest.mark.parametrize("d", [1, 7, 16])
def test_weight_side_forward_matches_the_activation_side(variant, d, monkeypatch, rotated_linear_calls):
    layer = _adapted(nn.Linear(d, 5).double(), variant)
    x = torch.randn(3, 4, d, dtype=torch.float64)
    monkeypatch.setattr(goft.layers, "WEIGHT_SIDE", False)
    want = _step(layer, x)
    assert not rotated_linear_calls
    monkeypatch.setattr(goft.layers, "WEIGHT_SIDE", True)
    got = _step(layer, x)
    assert len(rotated_linear_calls) == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


_HOOKS = {
    "forward pre-hook": lambda m: m.register_forward_pre_hook(lambda *a: None),
    "backward hook": lambda m: m.register_full_backward_hook(lambda *a: None),
    "backward pre-hook": lambda m: m.register_full_backward_pre_hook(lambda *a: None),
    # Every module's, as profilers and accelerate register them.
    "global forward hook": lambda m: torch.nn.modules.module.register_module_forward_hook(lambda *a: None),
    "global forward pre-hook": lambda m: torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None),
    "global backward hook": lambda m: torch.nn.modules.module.register_module_full_backward_hook(lambda *a: None),
    "global backward pre-hook":
        lambda m: torch.nn.modules.module.register_module_full_backward_pre_hook(lambda *a: None),
}


@pytest.mark.parametrize("hook", list(_HOOKS))
def test_weight_side_is_not_taken_where_a_hook_would_miss_the_base_layers_call(monkeypatch, rotated_linear_calls,
                                                                               hook):
    monkeypatch.setattr(goft.layers, "WEIGHT_SIDE", True)
    layer = _adapted(nn.Linear(8, 5), "strict")
    x = torch.randn(6, 8, requires_grad=True)
    handle = _HOOKS[hook](layer.base_layer)
    try:
        layer(x).sum().backward()
    finally:
        handle.remove()
    assert not rotated_linear_calls
    layer(x)
    assert len(rotated_linear_calls) == 1


def test_weight_side_is_only_taken_where_it_computes_the_same(monkeypatch, rotated_linear_calls):
    monkeypatch.setattr(goft.layers, "WEIGHT_SIDE", True)
    x = torch.randn(6, 8)
    conv = _adapted(transformers.pytorch_utils.Conv1D(5, 8), "strict")
    conv(x)
    assert not rotated_linear_calls, "Conv1D is not an nn.Linear"

    class Doubled(nn.Linear):  # a subclass's own forward must run, not F.linear on its weight
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = _adapted(Doubled(8, 5), "strict")
    torch.testing.assert_close(doubled(x), 2 * _adapted_reference(doubled, x))
    assert not rotated_linear_calls, "an nn.Linear subclass is not a plain nn.Linear"

    layer = _adapted(nn.Linear(8, 5), "strict")
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    y = layer(x)
    handle.remove()
    assert not rotated_linear_calls and len(seen) == 1, "a hooked base layer must see its call"
    torch.testing.assert_close(y, layer.base_layer(seen[0]))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert not rotated_linear_calls, "autocast picks the matmul's dtype"

    layer(x)
    assert len(rotated_linear_calls) == 1
    monkeypatch.setattr(goft.layers, "WEIGHT_SIDE", None)  # automatic: CUDA inputs only
    layer(x)
    assert len(rotated_linear_calls) == 1


def test_automatic_weight_side_threshold_for_cuda_inputs(monkeypatch):
    """The automatic choice (WEIGHT_SIDE None) decided for CUDA inputs, which fake tensors give
    without a GPU: the weight's rows once x has as many rows (all leading dimensions together)
    as the layer has outputs, never for CPU inputs, and not when x's dtype differs from the weight's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(goft.layers, "WEIGHT_SIDE", None)
    layer = goft.GivensLinear(torch.nn.Linear(8, 6))
    layer.add_adapter("default", goft.GOFTConfig())
    with FakeTensorMode():
        for shape, expected in (((6, 8), True), ((5, 8), False), ((2, 3, 8), True), ((1, 5, 8), False),
                                ((7, 8), True)):
            assert layer._rotates_weight(torch.empty(*shape, device="cuda")) is expected, shape
            assert layer._rotates_weight(torch.empty(*shape)) is False, shape
        assert layer._rotates_weight(torch.empty(64, 8, device="cuda", dtype=torch.bfloat16)) is False


def test_weight_side_env_values(monkeypatch):
    for value, mode in (("", None), ("auto", None), ("0", False), ("1", True)):
        monkeypatch.setenv("GOFT_WEIGHT_SIDE", value)
        assert goft.layers._weight_side_from_env() is mode
    monkeypatch.setenv("GOFT_WEIGHT_SIDE", "yes")
    with pytest.raises(ValueError, match="GOFT_WEIGHT_SIDE must be 0, 1 or auto, got 'yes'"):
        goft.layers._weight_side_from_env()


def test_weight_side_under_torch_compile(monkeypatch, rotated_linear_calls):
    torch._dynamo.reset()
    monkeypatch.setattr(goft.layers, "WEIGHT_SIDE", True)
    layer = _adapted(nn.Linear(16, 8), "strict")
    x = torch.randn(40, 16)
    want = _step(layer, x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = _step(compiled, x)
    assert len(rotated_linear_calls) == 2, "eager and traced calls"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
