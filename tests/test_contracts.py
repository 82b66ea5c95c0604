"""Every loss declares itself here and inherits the contract of tests/contracts.py."""

from __future__ import annotations

import lossfuse
from contracts import LossContract
from lossfuse.ops import cross_entropy as ce_ops
from lossfuse.ops import focal as focal_ops
from lossfuse.ops import huber as huber_ops


def pytest_generate_tests(metafunc):
    # The variants are the declaring class's (its catalog entry's): parametrised per subclass.
    if metafunc.cls is not None and "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", metafunc.cls.variants(), ids=lambda v: v or "plain")


class TestCrossEntropy(LossContract):
    key = "ce"
    shape = (24, 7)
    module = lossfuse.CrossEntropyLoss
    function = lossfuse.CrossEntropyFunction
    ops_module = ce_ops


class TestSigmoidFocal(LossContract):
    key = "sigmoid_focal"
    shape = (24, 7)
    module = lossfuse.SigmoidFocalLoss
    function = lossfuse.SigmoidFocalFunction
    ops_module = focal_ops


class TestSoftmaxFocal(LossContract):
    key = "softmax_focal"
    shape = (24, 7)
    module = lossfuse.SoftmaxFocalLoss
    function = lossfuse.SoftmaxFocalFunction
    ops_module = focal_ops


class TestHuber(LossContract):
    key = "huber"
    shape = (24, 7)
    module = lossfuse.HuberLoss
    function = lossfuse.HuberFunction
    ops_module = huber_ops


class TestSmoothL1(LossContract):
    key = "smooth_l1"
    shape = (24, 7)
    module = lossfuse.SmoothL1Loss
    function = lossfuse.HuberFunction
    ops_module = huber_ops
