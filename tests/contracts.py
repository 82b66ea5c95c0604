"""The contract every lossfuse loss keeps, written once.

A loss declares itself by subclassing :class:`LossContract` (tests/test_contracts.py) with the key of its
description in lossfuse/catalog.py -- which says how to make its inputs and what torch code it
replaces -- plus its module, its Function and the ops module whose ``Op`` objects its path calls.
It then inherits every check below, on fresh random inputs each run:

- float64 parity with torch's code on every backend of the CPU and every catalog variant, loss and
  input gradient, in every dtype;
- float64 ``gradcheck`` of the C++ kernels;
- ``torch.library.opcheck`` of every op the loss's forward and backward actually call (recorded, so
  an op added to the path is checked without anyone listing it);
- ``torch.compile(fullgraph=True)`` of the function, and of the module inside a model;
- double backward refused (the Functions are once-differentiable);
- the portable (non-AVX2) kernels, forced at run time, against float64;
- the loss-scaling rule under autocast: with grad_output 2^16 every float16/bfloat16 gradient element
  within 1 ulp of the float64 gradient times 2^16, the same elements zero;
- bad arguments (reduction, backend) raise torch's exception types; the public names are exported.

Loss-specific behaviour (layouts, extreme values, options only one loss has) stays in that loss's
test file.
"""

from __future__ import annotations

import pytest
import torch

import lossfuse
from helpers import DTYPES, NARROW_ISAS, assert_close, backend_or_skip, cpu_kernels_or_skip, forced_cpu_isa, spy_ops, ulps_apart
from lossfuse import catalog

LOW_PRECISION = [torch.float16, torch.bfloat16]


def _fresh_generator() -> torch.Generator:
    gen = torch.Generator()
    gen.seed()
    return gen


def _check_compiled(fn, x, rest, what: str = "") -> None:
    """torch.compile(fullgraph=True) of ``2 * fn(x, *rest)`` equals eager, loss and input gradient."""
    torch._dynamo.reset()

    def step(x, *rest):
        return fn(x, *rest) * 2.0

    compiled = torch.compile(step, fullgraph=True)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager, out = step(xe, *rest), compiled(xc, *rest)
    torch.testing.assert_close(out, eager, msg=lambda m: f"{what}: {m}")
    eager.backward()
    out.backward()
    torch.testing.assert_close(xc.grad, xe.grad, msg=lambda m: f"{what}: {m}")


class LossContract:
    """Subclass with ``key`` (a lossfuse/catalog.py entry), ``shape`` (a small (N, C) shape),
    ``module`` (the lossfuse nn.Module, default-constructed in the model test), ``function`` (the
    autograd Function) and ``ops_module`` (the lossfuse.ops module whose Op objects the path calls)."""

    key: str
    shape: tuple = (24, 7)
    module: type
    function: type
    ops_module: object

    # --- the declaration's helpers -------------------------------------------------------------

    @property
    def entry(self) -> catalog.LossEntry:
        return catalog.LOSSES[self.key]

    @classmethod
    def variants(cls) -> list[str]:
        return list(catalog.LOSSES[cls.key].variants)

    def inputs(self, variant: str, dtype: torch.dtype, shape=None):
        """(x, rest): the differentiable input and the other call arguments, fresh random values."""
        tensors = self.entry.make_inputs(shape or self.shape, dtype, variant, torch.device("cpu"),
                                         _fresh_generator())
        values = list(tensors.values())
        return values[0], values[1:]

    def call(self, x, rest, variant: str, backend: str = "cpu"):
        fn = catalog.lossfuse_function(self.entry)
        return self.entry.lossfuse_call(variant)(fn, x, *rest, backend=backend)

    def reference64(self, x, rest, variant: str):
        """torch's code on float64 copies: (loss, d loss / d x), both float64."""
        xd = x.detach().double().requires_grad_(True)
        rd = [t.double() if t.is_floating_point() else t for t in rest]
        loss = self.entry.torch_call(variant)(xd, *rd)
        (g,) = torch.autograd.grad(loss, xd)
        return loss.detach(), g

    # --- the contracts -------------------------------------------------------------------------

    @pytest.mark.parametrize("backend", ["cpu", "reference"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_matches_torch_in_float64(self, variant, dtype, backend):
        backend_or_skip(backend)
        x, rest = self.inputs(variant, dtype)
        xr = x.clone().requires_grad_(True)
        loss = self.call(xr, rest, variant, backend)
        loss.backward()
        ref, gref = self.reference64(x, rest, variant)
        assert loss.dtype == self.entry.torch_call(variant)(x, *rest).dtype, "result dtype differs from torch's"
        assert_close(loss, ref, dtype, f"{self.key}[{variant}] loss")
        assert_close(xr.grad, gref, dtype, f"{self.key}[{variant}] grad")

    def test_gradcheck_float64(self, variant):
        cpu_kernels_or_skip()
        x, rest = self.inputs(variant, torch.float64, shape=(5, 4))
        x.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: self.call(x, rest, variant, "cpu"), (x,))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_opcheck_every_op_on_the_path(self, monkeypatch, variant, dtype):
        cpu_kernels_or_skip()
        calls: list = []
        spy_ops(monkeypatch, self.ops_module, calls)
        x, rest = self.inputs(variant, dtype)
        x.requires_grad_(True)
        self.call(x, rest, variant, "cpu").backward()
        assert calls, f"{self.key}: no lossfuse op was called"
        monkeypatch.undo()
        for name, args in calls:
            # Copies: opcheck calls the op several times, and a recorded tensor may since have changed.
            args = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
            torch.library.opcheck(getattr(torch.ops.lossfuse, name).default, args)

    def compile_cases(self) -> dict:
        """Loss-specific calls the compile contract runs too, beside the catalog's variants:
        name -> (x, rest, fn) with ``fn(x, *rest)`` the loss. Override to add layouts or options."""
        return {}

    def test_torch_compile_fullgraph(self, variant):
        cpu_kernels_or_skip()
        x, rest = self.inputs(variant, torch.float32)
        _check_compiled(lambda x, *rest: self.call(x, rest, variant, "cpu"), x, rest)

    def test_torch_compile_fullgraph_extra_cases(self):
        cpu_kernels_or_skip()
        for name, (x, rest, fn) in self.compile_cases().items():
            _check_compiled(fn, x, rest, name)

    def test_module_compiled_in_a_model(self):
        cpu_kernels_or_skip()
        torch._dynamo.reset()
        variant = self.variants()[0]
        x, rest = self.inputs(variant, torch.float32)
        n, c = self.shape
        model = torch.nn.Linear(16, c)
        features = torch.randn(n, 16)
        crit = self.module()
        compiled = torch.compile(lambda f, *rest: crit(model(f), *rest), fullgraph=True)
        loss = compiled(features, *rest)
        loss.backward()
        g = model.weight.grad.clone()
        model.weight.grad = None
        ref = self.entry.torch_call(variant)(model(features), *rest)
        ref.backward()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(g, model.weight.grad)

    def test_double_backward_is_refused(self, variant):
        cpu_kernels_or_skip()
        x, rest = self.inputs(variant, torch.float32)
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(self.call(x, rest, variant, "cpu"), x, create_graph=True)
        with pytest.raises(RuntimeError):
            g.sum().backward()

    @pytest.mark.parametrize("isa", NARROW_ISAS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_narrower_isa_kernels_match(self, variant, dtype, isa):
        with forced_cpu_isa(isa):
            x, rest = self.inputs(variant, dtype)
            xr = x.clone().requires_grad_(True)
            loss = self.call(xr, rest, variant, "cpu")
            loss.backward()
        ref, gref = self.reference64(x, rest, variant)
        assert_close(loss, ref, dtype, f"{self.key}[{variant}] {isa} loss")
        assert_close(xr.grad, gref, dtype, f"{self.key}[{variant}] {isa} grad")

    # Variants whose float32 gradient is free of cancellation, where "within 1 ulp of float64" is a
    # property of the kernel rather than of float32 arithmetic (see TestCrossEntropy).
    def autocast_variants(self) -> list[str]:
        return self.variants()

    @pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
    def test_loss_scaling_under_autocast(self, variant, dtype):
        """GradScaler's first step: the gradient of 2^16 x loss, formed in fp32 and cast once."""
        cpu_kernels_or_skip()
        if variant not in self.autocast_variants():
            pytest.skip(f"{self.key}[{variant}]: the gradient is a difference formed in float32 (see autocast_variants)")
        scale = 2.0 ** 16
        x, rest = self.inputs(variant, dtype, shape=(self.shape[0] * 8, self.shape[1]))
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            loss = self.call(xr, rest, variant, "cpu")
        loss.backward(torch.full_like(loss, scale))
        _, gref = self.reference64(x, rest, variant)
        expected = gref * scale
        ulps = ulps_apart(xr.grad, expected, dtype)
        assert ulps.max().item() <= 1.0, f"{self.key}[{variant}]: max {ulps.max().item():.2f} ulp"
        assert torch.equal(xr.grad == 0, expected.to(dtype) == 0), "different elements flushed to zero"

    def test_bad_reduction_and_backend(self):
        variant = self.variants()[0]
        x, rest = self.inputs(variant, torch.float32)
        fn = catalog.lossfuse_function(self.entry)
        with pytest.raises(ValueError, match="backend must be one of .*got 'cuda'"):
            self.entry.lossfuse_call(variant)(fn, x, *rest, backend="cuda")
        with pytest.raises(ValueError, match="backend must be one of"):
            self.module(backend="fast")
        with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
            fn(x, *rest, reduction="avg")

    def test_exports(self):
        name = self.entry.lossfuse_name
        for public in (name, self.module.__name__, self.function.__name__):
            assert public in lossfuse.__all__, public
        assert name in lossfuse.functional.__all__
        assert getattr(lossfuse, name) is getattr(lossfuse.functional, name)
        assert getattr(lossfuse, self.function.__name__) is self.function
