"""Every loss declares itself here and inherits the contract of tests/contracts.py."""

from __future__ import annotations

import torch

import lossfuse
from contracts import LossContract
from lossfuse.ops import cross_entropy as ce_ops
from lossfuse.ops import distillation as distill_ops
from lossfuse.ops import focal as focal_ops
from lossfuse.ops import huber as huber_ops
from lossfuse.ops import kl_div as kl_ops


def pytest_generate_tests(metafunc):
    # The variants are the declaring class's (its catalog entry's): parametrised per subclass.
    if metafunc.cls is not None and "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", metafunc.cls.variants(), ids=lambda v: v or "plain")


class TestCrossEntropy(LossContract):
    key, module, function, ops_module = "ce", lossfuse.CrossEntropyLoss, lossfuse.CrossEntropyFunction, ce_ops

    def autocast_variants(self):
        # With smoothing (and with probability targets) a gradient element is a difference of float32
        # terms, p_c sum_k w_k - w_c or p_c - t_c: where they nearly cancel, the float32 result carries
        # the rounding of the terms, several ulps of the small difference. The 1-ulp check belongs to
        # the class-index gradient p_c - [c = y], whose target term is formed without cancellation.
        return ["", "ignore_index"]

    def compile_cases(self):
        # The (N, C, S) segmentation layout with class weights and smoothing, both target kinds.
        x = torch.randn(8, 2, 33)
        w = torch.rand(2) + 0.1
        y = torch.randint(0, 2, (8, 33))
        p = torch.softmax(torch.randn(8, 2, 33), 1)
        ce = lambda x, t, w: lossfuse.cross_entropy(x, t, weight=w, label_smoothing=0.1)  # noqa: E731
        return {"spatial index": (x, (y, w), ce), "spatial probability": (x, (p, w), ce)}


class TestSigmoidFocal(LossContract):
    key, module, function, ops_module = "sigmoid_focal", lossfuse.SigmoidFocalLoss, lossfuse.SigmoidFocalFunction, focal_ops


class TestSoftmaxFocal(LossContract):
    key, module, function, ops_module = "softmax_focal", lossfuse.SoftmaxFocalLoss, lossfuse.SoftmaxFocalFunction, focal_ops

    def compile_cases(self):
        x = torch.randn(8, 5, 6)
        y = torch.randint(0, 5, (8, 6))
        y[0, :2] = -100
        alpha, w = torch.rand(5), torch.rand(5) + 0.1
        sf = lambda x, y, a, w: lossfuse.softmax_focal_loss(x, y, alpha=a, weight=w)  # noqa: E731
        return {"spatial, alpha and weight tensors": (x, (y, alpha, w), sf)}


class TestHuber(LossContract):
    key, module, function, ops_module = "huber", lossfuse.HuberLoss, lossfuse.HuberFunction, huber_ops


class TestSmoothL1(LossContract):
    key, module, function, ops_module = "smooth_l1", lossfuse.SmoothL1Loss, lossfuse.HuberFunction, huber_ops


class TestDistillation(LossContract):
    key, module, function, ops_module = (
        "distill", lossfuse.DistillationLoss, lossfuse.DistillationFunction, distill_ops)

    def compile_cases(self):
        # (N, V, d) logits, teacher requiring grad, JSD with labels.
        s, t = torch.randn(4, 9, 5), torch.randn(4, 9, 5).requires_grad_(True)
        y = torch.randint(0, 9, (4, 5))
        y[0, :2] = -100
        fn = lambda s, t, y: lossfuse.distillation_loss(s, t, temperature=2.0, beta=0.5, target=y)  # noqa: E731
        return {"spatial, teacher grad, jsd": (s, (t, y), fn)}


class TestKLDiv(LossContract):
    key, module, function, ops_module = "kl_div", lossfuse.KLDivLoss, lossfuse.KLDivFunction, kl_ops
