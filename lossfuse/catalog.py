"""One description per loss, used by ``python -m lossfuse.verify``, the benchmark suite
(``lossfuse-bench``) and the tests: how to make its inputs for a shape, the plain-PyTorch code it
replaces (timed as torch eager and torch.compile, and evaluated in float64 as the oracle), the lossfuse
call, the bytes it must move, and -- in ``TOLERANCES`` -- how close to the float64 result each dtype
must come.

An entry says, for one loss:

* ``make_inputs(shape, dtype, variant, device, gen)``: the tensors of one call, in call order, random
  (never zeros or constants: they hide unwritten outputs and can run faster than real data);
* ``torch_fn(*tensors)``: what people use today, in plain PyTorch. It is timed as "torch" (eager), compiled
  as "torch.compile", and evaluated on float64 copies of the inputs as the correctness oracle;
* ``lossfuse_fn(fn, *tensors, backend=...)``: the lossfuse call (``fn`` is ``getattr(lossfuse, lossfuse_name)``,
  so an entry whose function lossfuse does not have yet is skipped with a note, not an error);
* ``counted_bytes(shape, dtype, variant, mode)`` and ``bytes_formula``: the bytes any implementation must
  move: each input read once, each output written once (see ``_count``);
* optionally ``counted_flops(shape, dtype, variant, mode)`` and ``flops_formula``, for a loss whose
  arithmetic, not its memory traffic, bounds its time (linear + cross-entropy: matmuls);
* optionally ``mem_ref_bytes(shape, dtype, variant)`` and ``mem_ref_name``: what ``extra_mem_pct`` is a
  percentage of (default: the size of the differentiable inputs);
* optionally ``anchor``: the provider the loss's ``speedup_vs_anchor`` column compares with;
* optionally ``options``: keyword arguments per variant, passed to both ``torch_fn`` and ``lossfuse_fn``
  (``torch_call(variant)`` / ``lossfuse_call(variant)`` bind them).

Every loss is timed with ``reduction="mean"`` and, unless a variant says otherwise, the torch/torchvision
defaults for its options.

To add a loss: write its three callables and its byte formula, append a ``LossEntry`` to ``LOSSES``, and
give it shapes in ``presets.py``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

# "eval": the forward under torch.no_grad(), as validation and inference loops call a loss (no graph,
# nothing saved for a backward); it reads what "fwd" reads.
MODES = ("fwd", "bwd", "fwd+bwd", "eval")


# ---------------------------------------------------------------------------------------------------
# Tolerances: the one table. A lossfuse result is compared with the float64 result element by element,
# |actual - expected| <= atol * max|expected| + rtol * |expected|: atol scales with the largest value, so
# one row serves losses of size 10 and gradients of size 1e-5; rtol allows one rounding of the output
# dtype (half an ulp is 2^-11 for float16, 2^-8 for bfloat16) with room for the accumulation order.
# ``norm`` bounds ||actual - expected|| / ||expected||, the check every benchmark provider passes before
# it is timed -- torch's own low-precision code included, which rounds in more places than lossfuse.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    norm: float


TOLERANCES = {
    torch.float64: Tolerance(atol=1e-12, rtol=1e-10, norm=1e-9),
    torch.float32: Tolerance(atol=2e-6, rtol=2e-5, norm=1e-5),
    torch.float16: Tolerance(atol=2e-3, rtol=2 ** -10, norm=5e-3),
    torch.bfloat16: Tolerance(atol=1.6e-2, rtol=2 ** -7, norm=1e-2),
}


def mismatches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, rtol: float | None = None):
    """(bad, err, tol): the elements of ``actual`` outside ``dtype``'s tolerance around the float64
    ``expected``. Non-finite expected values must be matched exactly (NaN where NaN, the same infinity);
    NaN in ``actual`` where the expected value is finite is a mismatch."""
    tol_row = TOLERANCES[dtype]
    rtol = tol_row.rtol if rtol is None else rtol
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    finite = torch.isfinite(e)
    same_nonfinite = (torch.isnan(a) & torch.isnan(e)) | (a == e)
    bad = ~finite & ~same_nonfinite
    scale = e[finite].abs().max().item() if finite.any() else 0.0
    # Floor the scale: where every expected value is 0 (C = 1), roundoff still needs some room.
    scale = max(scale, 1e-3)
    tol = tol_row.atol * scale + rtol * e.abs()
    err = (a - e).abs()
    bad |= finite & ~(err <= tol)
    return bad, err, tol


def error_ratio(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    """The worst element's error as a multiple of its tolerance: <= 1 passes; inf for a non-finite
    mismatch (NaN against a number, or a wrong infinity)."""
    bad, err, tol = mismatches(actual, expected, dtype)
    finite = torch.isfinite(expected.detach().to(torch.float64).cpu())
    if (bad & ~(finite & torch.isfinite(err))).any():
        return math.inf
    ratio = err[finite] / tol[finite]
    return float(ratio.max()) if ratio.numel() else 0.0


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def _count(inputs_read: int, grads_written: int, mode: str) -> int:
    """Counted bytes of one call.

    fwd      reads every input once (the scalar loss it writes is ignored);
    bwd      reads every input once and writes the gradient of each differentiable input once
             (what an implementation saves for itself, e.g. a per-row log-sum-exp, is not counted);
    fwd+bwd  the same: a fused single-pass implementation reads the inputs once and writes the
             gradients once, so that is the floor the whole training step is measured against;
    eval     as fwd (the forward under no_grad writes no gradient).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    return inputs_read if mode in ("fwd", "eval") else inputs_read + grads_written


@dataclass(frozen=True)
class LossEntry:
    key: str                    # the --loss name
    title: str                  # for tables and plots
    lossfuse_name: str          # the function in the top-level lossfuse namespace
    make_inputs: Callable       # (shape, dtype, variant, device, generator) -> dict name -> tensor
    torch_fn: Callable          # (*tensors) -> scalar loss: the torch code timed eager and compiled
    lossfuse_fn: Callable       # (lossfuse function, *tensors, backend=str) -> scalar loss
    counted_bytes: Callable     # (shape, dtype, variant, mode) -> int
    bytes_formula: str          # the formula, as printed in the output and the README
    grad_inputs: tuple = ("input",)     # the tensors that require grad (their gradients are outputs)
    variants: dict = field(default_factory=lambda: {"": ""})   # variant -> description
    size_name: str = "elements of the input"
    # extra_mem_pct = (peak - gradients returned) / mem_ref_bytes(shape, dtype, variant); None: the size
    # of the differentiable inputs (the grad_inputs tensors).
    mem_ref_bytes: Callable | None = None
    mem_ref_name: str = "the differentiable inputs"
    # Arithmetic a call must do, for losses bound by it rather than by memory traffic; None: not counted.
    counted_flops: Callable | None = None   # (shape, dtype, variant, mode) -> int
    flops_formula: str = ""
    anchor: str | None = None   # provider of the speedup_vs_anchor column (an established fused implementation)
    lossfuse_notes: dict = field(default_factory=dict)   # mode -> note on the lossfuse rows of that mode
    modes: tuple = MODES        # the modes that can be measured; others get a skipped row with modes_note
    modes_note: str = ""
    compile_note: str = ""      # set: torch.compile is not run on this entry, and this says why
    unavailable_note: str = ""  # why the entry is skipped when its lossfuse function is missing (default: not merged yet)

    options: dict = field(default_factory=dict)   # variant -> keyword arguments of both calls

    def label_variant(self, variant: str) -> str:
        return self.variants.get(variant, variant)

    def torch_call(self, variant: str = "") -> Callable:
        """``torch_fn`` with the variant's options bound: (*tensors) -> loss."""
        kw = self.options.get(variant)
        return functools.partial(self.torch_fn, **kw) if kw else self.torch_fn

    def lossfuse_call(self, variant: str = "") -> Callable:
        """``lossfuse_fn`` with the variant's options bound: (fn, *tensors, backend=...) -> loss."""
        kw = self.options.get(variant)
        return functools.partial(self.lossfuse_fn, **kw) if kw else self.lossfuse_fn


def _randn(shape, dtype, device, gen, scale=1.0, shift=0.0):
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if scale != 1.0 or shift != 0.0:
        x = x * scale + shift
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------------
# Cross-entropy: logits (N, C) or (N, C, d1, ..., dk), int64 class-index targets.
# ---------------------------------------------------------------------------------------------------

IGNORE_FRACTION = 0.05  # of the targets set to ignore_index in the "ignore_index" variant


def _ce_inputs(shape, dtype, variant, device, gen):
    x = _randn(shape, dtype, device, gen, scale=2.0)
    tshape = (shape[0],) + tuple(shape[2:])
    if variant == "probability":
        t = torch.softmax(torch.randn(shape, generator=gen, device=device), 1).to(dtype)
        return {"input": x, "target": t}
    y = torch.randint(0, shape[1], tshape, generator=gen, device=device)
    if variant in ("ignore_index", "weight+smoothing", "alpha+ignore"):
        drop = torch.rand(tshape, generator=gen, device=device) < IGNORE_FRACTION
        y = torch.where(drop, torch.full_like(y, -100), y)
    if variant == "weight+smoothing":
        w = (torch.rand(shape[1], generator=gen, device=device) + 0.1).to(dtype)
        return {"input": x, "target": y, "weight": w}
    return {"input": x, "target": y}


def _ce_torch(x, y, weight=None, label_smoothing=0.0):
    # ignore_index=-100, torch's default, serves the ignore variants
    return F.cross_entropy(x, y, weight=weight, label_smoothing=label_smoothing)


def _ce_lossfuse(fn, x, y, weight=None, *, backend, label_smoothing=0.0):
    return fn(x, y, weight=weight, label_smoothing=label_smoothing, backend=backend)


def _ce_bytes(shape, dtype, variant, mode):
    rows = numel(shape) // shape[1]        # N * d1 * ... * dk targets
    logits = numel(shape) * itemsize(dtype)
    targets = logits if variant == "probability" else rows * 8
    weight = shape[1] * itemsize(dtype) if variant == "weight+smoothing" else 0
    return _count(logits + targets + weight, logits, mode)


CE_FORMULA = ("fwd, eval: N*C*b + R*8;  bwd, fwd+bwd: 2*N*C*b + R*8  "
              "(b = bytes per logit, R = N*d1*...*dk int64 targets; probability targets: N*C*b instead "
              "of R*8; class weights add C*b)")

# ---------------------------------------------------------------------------------------------------
# Sigmoid focal loss (torchvision.ops.sigmoid_focal_loss, alpha=0.25, gamma=2, mean):
# logits (N, C); float 0/1 targets of the same shape, or int64 class indices (N,) with C = background.
# ---------------------------------------------------------------------------------------------------

POSITIVE_FRACTION = 0.01  # of the (N, C) target elements that are 1, in both target forms


def _sigmoid_focal_inputs(shape, dtype, variant, device, gen):
    n, c = shape
    x = _randn(shape, dtype, device, gen, scale=2.0)
    if variant == "index":
        # Foreground rows with probability C * 1%, so both target forms hold 1% positives.
        fg = torch.rand(n, generator=gen, device=device) < min(1.0, POSITIVE_FRACTION * c)
        cls = torch.randint(0, c, (n,), generator=gen, device=device)
        return {"input": x, "target": torch.where(fg, cls, torch.full_like(cls, c))}
    t = (torch.rand(shape, generator=gen, device=device) < POSITIVE_FRACTION).to(dtype)
    return {"input": x, "target": t}


def _torchvision_sigmoid_focal(inputs, targets, alpha=0.25, gamma=2.0):
    """torchvision.ops.sigmoid_focal_loss, reduction="mean", as torchvision writes it."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss.mean()


def _sigmoid_focal_torch(x, t):
    if not t.is_floating_point():  # class indices: what torch users do, a one-hot first
        t = F.one_hot(t, x.shape[1] + 1)[:, : x.shape[1]].to(x.dtype)
    return _torchvision_sigmoid_focal(x, t)


def _sigmoid_focal_lossfuse(fn, x, t, *, backend):
    return fn(x, t, alpha=0.25, gamma=2.0, reduction="mean", backend=backend)


def _sigmoid_focal_bytes(shape, dtype, variant, mode):
    n, c = shape
    x = n * c * itemsize(dtype)
    t = n * 8 if variant == "index" else n * c * itemsize(dtype)
    return _count(x + t, x, mode)


SIGMOID_FOCAL_FORMULA = ("fwd, eval: N*C*b + T;  bwd, fwd+bwd: 2*N*C*b + T  "
                         "(T = N*C*b for float targets, N*8 for int64 class-index targets)")

# ---------------------------------------------------------------------------------------------------
# Softmax focal loss (gamma=2, alpha=None, mean): logits (N, C), int64 targets.
# ---------------------------------------------------------------------------------------------------


def _softmax_focal_torch(x, y, alpha=None, gamma=2.0):
    """loss_n = alpha (1 - p_y)^gamma * (-log p_y), mean over the rows not ignored: what people write in
    plain torch."""
    keep = y != -100
    logp = F.log_softmax(x, dim=1).gather(1, torch.where(keep, y, 0).unsqueeze(1)).squeeze(1)
    loss = (1 - logp.exp()) ** gamma * -logp
    if alpha is not None:
        loss = alpha * loss
    return torch.where(keep, loss, 0).sum() / keep.sum()


def _softmax_focal_lossfuse(fn, x, y, *, backend, alpha=None):
    return fn(x, y, alpha=alpha, gamma=2.0, reduction="mean", backend=backend)


# ---------------------------------------------------------------------------------------------------
# Huber / SmoothL1 (delta = beta = 1, mean): input and target of the same shape; input requires grad.
# ---------------------------------------------------------------------------------------------------


def _regression_inputs(shape, dtype, variant, device, gen):
    return {"input": _randn(shape, dtype, device, gen, scale=2.0),
            "target": _randn(shape, dtype, device, gen, scale=2.0)}


def _huber_torch(x, y):
    return F.huber_loss(x, y)


def _huber_lossfuse(fn, x, y, *, backend):
    return fn(x, y, reduction="mean", delta=1.0, backend=backend)


def _smooth_l1_torch(x, y, beta=1.0):
    return F.smooth_l1_loss(x, y, beta=beta)


def _smooth_l1_lossfuse(fn, x, y, *, backend, beta=1.0):
    return fn(x, y, reduction="mean", beta=beta, backend=backend)


def _regression_bytes(shape, dtype, variant, mode):
    x = numel(shape) * itemsize(dtype)
    return _count(2 * x, x, mode)


REGRESSION_FORMULA = "fwd, eval: 2*n*b;  bwd, fwd+bwd: 3*n*b  (n elements of input and of target, b bytes each)"

# ---------------------------------------------------------------------------------------------------
# Linear + cross-entropy (mean): hidden states (N, H), the projection's weight (V, H), int64 targets
# (N,); input and weight require grad. Shape (N, H, V). The (N, V) logits are an intermediate: a fused
# implementation never holds them whole, so the memory reference is their size, not the inputs'.
# ---------------------------------------------------------------------------------------------------


def _lce_inputs(shape, dtype, variant, device, gen):
    n, h, v = shape
    # Weight std 2/sqrt(H): logits of std ~2 (as the cross-entropy entry's), max over the vocabulary ~8-10.
    return {"input": _randn((n, h), dtype, device, gen),
            "linear_weight": _randn((v, h), dtype, device, gen, scale=2.0 / math.sqrt(h)),
            "target": torch.randint(0, v, (n,), generator=gen, device=device)}


def _lce_torch(x, w, y):
    return F.cross_entropy(F.linear(x, w), y)


def _lce_lossfuse(fn, x, w, y, *, backend):
    return fn(x, w, y, backend=backend)


def _lce_bytes(shape, dtype, variant, mode):
    n, h, v = shape
    b = itemsize(dtype)
    return _count((n * h + v * h) * b + n * 8, (n * h + v * h) * b, mode)


def _lce_flops(shape, dtype, variant, mode):
    """The projection's matmuls: logits = x W^T (fwd), grad_x = G W and grad_W = G^T x (bwd), 2*N*H*V
    each; the softmax's O(N*V) work is left out (H times smaller)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    n, h, v = shape
    return {"fwd": 1, "eval": 1, "bwd": 2, "fwd+bwd": 3}[mode] * 2 * n * h * v


def _lce_logits_bytes(shape, dtype, variant):
    n, _, v = shape
    return n * v * itemsize(dtype)


LCE_FORMULA = ("fwd, eval: (N*H + V*H)*b + N*8;  bwd, fwd+bwd: 2*(N*H + V*H)*b + N*8  (input (N, H), weight (V, H), "
               "b bytes each; int64 targets; the (N, V) logits are not counted). The matmul FLOPs dominate "
               "(fwd+bwd: 3 x 2*N*H*V): GB/s is not the lens here, GFLOP/s is")
LCE_FLOPS_FORMULA = "fwd, eval: 2*N*H*V;  bwd: 2 x 2*N*H*V;  fwd+bwd: 3 x 2*N*H*V  (the projection's matmuls)"


# ---------------------------------------------------------------------------------------------------
# A Hugging Face transformers training step (forward + backward of a small, wide Llama: 2 layers,
# hidden H, vocabulary V) on (B, T) tokens with labels = the tokens. Shape (B, T, H, V). The inputs are
# the token ids, the labels and every parameter of the model (so that the gradients are outputs and
# the memory above parameters + gradients is what the suite reports); each provider runs the model
# through torch.func.functional_call on them: "torch" is transformers' own loss, lossfuse-* is
# lossfuse.transformers.apply(model) (fused_linear=True), "hf-logits-lossfuse" apply(..., fused_linear=False).
# transformers is imported on first use only: the rest of the suite runs without it.
# ---------------------------------------------------------------------------------------------------

HF_LAYERS = 2
HF_PARAM_NAMES = (
    ("model.embed_tokens.weight",)
    + tuple(f"model.layers.{i}.{name}.weight" for i in range(HF_LAYERS)
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                         "post_attention_layernorm"))
    + ("model.norm.weight", "lm_head.weight")
)
_HF_MODELS: dict = {}


def _hf_intermediate(h: int) -> int:
    return 16 * max(1, round(8 * h / 3 / 16))  # Llama's MLP width, about 8/3 of the hidden size


def _hf_config(h: int, v: int, t: int):
    from transformers import LlamaConfig

    heads = max(1, h // 64)
    return LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=_hf_intermediate(h),
                       num_hidden_layers=HF_LAYERS, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max(t, 16), tie_word_embeddings=False)


def _hf_model(kind: str, backend: str, h: int, v: int, t: int, device):
    """The module a provider runs (its own parameters are never used: functional_call swaps in the
    inputs'), cached: "own" is transformers' model as it is, "fused" and "logits" are patched."""
    key = (kind, backend, h, v, t, str(device))
    model = _HF_MODELS.get(key)
    if model is None:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(_hf_config(h, v, t)).to(device).train()
        names = tuple(n for n, _ in model.named_parameters())
        if set(names) != set(HF_PARAM_NAMES):
            raise RuntimeError(f"this transformers' LlamaForCausalLM has other parameters than the hf entry "
                               f"expects: {sorted(set(names) ^ set(HF_PARAM_NAMES))}")
        if kind != "own":
            import lossfuse.transformers

            lossfuse.transformers.apply(model, fused_linear=kind == "fused", backend=backend)
        _HF_MODELS[key] = model
    return model


def hf_step(kind: str, backend: str, input_ids, labels, *params):
    """The loss of one forward of the ``kind`` model on ``params``; the caller runs backward."""
    v, h = params[0].shape
    model = _hf_model(kind, backend, h, v, input_ids.shape[1], input_ids.device)
    out = torch.func.functional_call(model, dict(zip(HF_PARAM_NAMES, params)), args=(),
                                     kwargs={"input_ids": input_ids, "labels": labels})
    return out.loss


def _hf_inputs(shape, dtype, variant, device, gen):
    b, t, h, v = shape
    model = _hf_model("own", "auto", h, v, t, device)
    shapes = dict(model.named_parameters())
    out = {"input_ids": torch.randint(0, v, (b, t), generator=gen, device=device)}
    out["labels"] = out["input_ids"].clone()   # transformers' convention: the loss shifts them
    for name in HF_PARAM_NAMES:
        p = shapes[name]
        if name.endswith("norm.weight"):   # RMSNorm scales: near 1, not constant
            out[name] = _randn(p.shape, dtype, device, gen, scale=0.1, shift=1.0)
        else:                              # transformers' initializer_range, 0.02
            out[name] = _randn(p.shape, dtype, device, gen, scale=0.02)
    return out


def _hf_torch(input_ids, labels, *params):
    return hf_step("own", "auto", input_ids, labels, *params)


def _hf_lossfuse(fn, input_ids, labels, *params, backend):
    return hf_step("fused", backend, input_ids, labels, *params)


def _hf_param_count(h: int, v: int) -> int:
    i = _hf_intermediate(h)
    return 2 * v * h + HF_LAYERS * (4 * h * h + 3 * h * i + 2 * h) + h


def _hf_bytes(shape, dtype, variant, mode):
    b, t, h, v = shape
    params = _hf_param_count(h, v) * itemsize(dtype)
    return _count(params + 2 * b * t * 8, params, mode)


def _hf_logits_bytes(shape, dtype, variant):
    b, t, _, v = shape
    return b * t * v * itemsize(dtype)


HF_FORMULA = ("fwd: P*b + 2*B*T*8;  fwd+bwd: 2*P*b + 2*B*T*8  (P parameters of the 2-layer Llama, b bytes "
              "each, read once and their gradients written once; int64 ids and labels)")


LOSSES: dict[str, LossEntry] = {
    e.key: e
    for e in [
        LossEntry(
            key="ce", title="cross-entropy", lossfuse_name="cross_entropy",
            make_inputs=_ce_inputs, torch_fn=_ce_torch, lossfuse_fn=_ce_lossfuse,
            counted_bytes=_ce_bytes, bytes_formula=CE_FORMULA,
            variants={"": "", "ignore_index": f"{IGNORE_FRACTION:.0%} of targets = ignore_index",
                      "weight+smoothing": f"class weights, label_smoothing 0.1, {IGNORE_FRACTION:.0%} ignored",
                      "probability": "probability targets, label_smoothing 0.05"},
            options={"weight+smoothing": {"label_smoothing": 0.1}, "probability": {"label_smoothing": 0.05}},
            size_name="logits (N*C*d1*...*dk)", anchor="liger",
        ),
        LossEntry(
            key="sigmoid_focal", title="sigmoid focal", lossfuse_name="sigmoid_focal_loss",
            make_inputs=_sigmoid_focal_inputs, torch_fn=_sigmoid_focal_torch,
            lossfuse_fn=_sigmoid_focal_lossfuse, counted_bytes=_sigmoid_focal_bytes,
            bytes_formula=SIGMOID_FOCAL_FORMULA,
            variants={"float": f"float targets, {POSITIVE_FRACTION:.0%} positives",
                      "index": "int64 class-index targets (C = background)"},
            size_name="logits (N*C)",
        ),
        LossEntry(
            key="softmax_focal", title="softmax focal", lossfuse_name="softmax_focal_loss",
            make_inputs=_ce_inputs, torch_fn=_softmax_focal_torch, lossfuse_fn=_softmax_focal_lossfuse,
            counted_bytes=_ce_bytes, bytes_formula=CE_FORMULA, size_name="logits (N*C)",
            variants={"": "", "alpha+ignore": f"alpha 0.25, {IGNORE_FRACTION:.0%} of targets = ignore_index"},
            options={"alpha+ignore": {"alpha": 0.25}},
        ),
        LossEntry(
            key="huber", title="Huber", lossfuse_name="huber_loss",
            make_inputs=_regression_inputs, torch_fn=_huber_torch, lossfuse_fn=_huber_lossfuse,
            counted_bytes=_regression_bytes, bytes_formula=REGRESSION_FORMULA, size_name="elements",
        ),
        LossEntry(
            key="smooth_l1", title="SmoothL1", lossfuse_name="smooth_l1_loss",
            make_inputs=_regression_inputs, torch_fn=_smooth_l1_torch, lossfuse_fn=_smooth_l1_lossfuse,
            counted_bytes=_regression_bytes, bytes_formula=REGRESSION_FORMULA, size_name="elements",
            variants={"": "", "beta=1/9": "beta 1/9 (the detection default)"}, options={"beta=1/9": {"beta": 1 / 9}},
        ),
        LossEntry(
            key="lce", title="linear + cross-entropy", lossfuse_name="linear_cross_entropy",
            make_inputs=_lce_inputs, torch_fn=_lce_torch, lossfuse_fn=_lce_lossfuse,
            counted_bytes=_lce_bytes, bytes_formula=LCE_FORMULA,
            grad_inputs=("input", "linear_weight"),
            size_name="N*H*V (multiply-adds of the projection)",
            mem_ref_bytes=_lce_logits_bytes, mem_ref_name="the full logits (N*V*b)",
            counted_flops=_lce_flops, flops_formula=LCE_FLOPS_FORMULA,
            anchor="torch-chunked",
            lossfuse_notes={
                "fwd": "computes the gradients in its forward when the inputs require grad (three matmuls)"},
            modes=("fwd", "fwd+bwd", "eval"),
            modes_note=("lossfuse and torch's chunked version compute the gradients in the forward and "
                        "refuse a second backward through one graph (retain_graph), which bwd repeats; "
                        "fwd+bwd is the measure"),
        ),
        LossEntry(
            key="hf", title=f"HF Llama training step ({HF_LAYERS} layers; torch = transformers' own loss)",
            lossfuse_name="transformers.apply",
            make_inputs=_hf_inputs, torch_fn=_hf_torch, lossfuse_fn=_hf_lossfuse,
            counted_bytes=_hf_bytes, bytes_formula=HF_FORMULA, grad_inputs=HF_PARAM_NAMES,
            size_name="B*T*H*V (batch, tokens, hidden, vocabulary)",
            mem_ref_bytes=_hf_logits_bytes, mem_ref_name="the full logits (B*T*V*b)",
            lossfuse_notes={"fwd+bwd": "lossfuse.transformers.apply(model): fused_linear=True, no logits"},
            modes=("fwd+bwd",),
            modes_note="a training step is measured as a whole (forward + backward)",
            compile_note="not compiled: the case is transformers' own model against lossfuse's patch of it",
            unavailable_note="the hf entry needs Hugging Face transformers (pip install 'lossfuse[transformers]')",
        ),
    ]
}


# ---------------------------------------------------------------------------------------------------
# Distillation (lossfuse.distillation_loss): student and teacher logits (N, V), optionally int64 labels
# (N,) whose ignore_index rows are masked; the student requires grad. torch's code is the usual
# kl_div of two log_softmax tensors (and liger-kernel's generalised JSD written the same way).
# ---------------------------------------------------------------------------------------------------


def _distill_inputs(shape, dtype, variant, device, gen):
    out = {"input": _randn(shape, dtype, device, gen, scale=2.0),
           "teacher": _randn(shape, dtype, device, gen, scale=2.0)}
    if "ignore" in variant:
        rows = (shape[0],) + tuple(shape[2:])
        y = torch.randint(0, shape[1], rows, generator=gen, device=device)
        drop = torch.rand(rows, generator=gen, device=device) < IGNORE_FRACTION
        out["target"] = torch.where(drop, torch.full_like(y, -100), y)
    return out


def _distill_torch(s, t, y=None, temperature=1.0, beta=0.0):
    """What distillation code writes today: log_softmax of both at T, kl_div, batchmean, times T^2."""
    ls = F.log_softmax(s / temperature, dim=1)
    lt = F.log_softmax(t / temperature, dim=1)
    if beta == 0 and y is None:
        return F.kl_div(ls, lt, log_target=True, reduction="batchmean") * temperature ** 2
    if beta == 0:
        rows = F.kl_div(ls, lt, log_target=True, reduction="none").sum(1)
    elif beta == 1:
        rows = F.kl_div(lt, ls, log_target=True, reduction="none").sum(1)
    else:
        log_m = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        rows = (beta * F.kl_div(log_m, lt, log_target=True, reduction="none")
                + (1 - beta) * F.kl_div(log_m, ls, log_target=True, reduction="none")).sum(1)
    rows = rows * temperature ** 2
    if y is None:
        return rows.sum() / rows.shape[0]
    keep = y != -100
    return torch.where(keep, rows, 0).sum() / keep.sum()


def _distill_lossfuse(fn, s, t, y=None, *, backend, temperature=1.0, beta=0.0):
    return fn(s, t, temperature=temperature, beta=beta, target=y, backend=backend)


def _distill_bytes(shape, dtype, variant, mode):
    logits = numel(shape) * itemsize(dtype)
    rows = numel(shape) // shape[1] * 8 if "ignore" in variant else 0
    return _count(2 * logits + rows, logits, mode)


DISTILL_FORMULA = ("fwd: 2*N*V*b;  bwd, fwd+bwd: 3*N*V*b  (student and teacher logits read once, the student's "
                   "gradient written once; the ignore variants add N*8 for the labels)")

LOSSES.update({
    e.key: e
    for e in [
        LossEntry(
            key="distill", title="distillation", lossfuse_name="distillation_loss",
            make_inputs=_distill_inputs, torch_fn=_distill_torch, lossfuse_fn=_distill_lossfuse,
            counted_bytes=_distill_bytes, bytes_formula=DISTILL_FORMULA,
            variants={"": "forward KL(teacher || student), T = 1",
                      "T=2, ignore": f"forward KL, T = 2, {IGNORE_FRACTION:.0%} of rows ignored",
                      "reverse": "reverse KL(student || teacher), T = 2",
                      "jsd, ignore": f"generalised JSD beta = 0.5, T = 2, {IGNORE_FRACTION:.0%} of rows ignored"},
            options={"T=2, ignore": {"temperature": 2.0}, "reverse": {"temperature": 2.0, "beta": 1.0},
                     "jsd, ignore": {"temperature": 2.0, "beta": 0.5}},
            size_name="logits (N*V), each of two", anchor="liger",
        ),
    ]
})


# ---------------------------------------------------------------------------------------------------
# kl_div (torch.nn.functional.kl_div): log-probabilities (N, C) and a probability target (a log-probability
# one with log_target); the input requires grad.
# ---------------------------------------------------------------------------------------------------

ZERO_FRACTION = 0.25  # of the target's elements set to exactly 0 in the "zeros" variants (0 log 0 = 0)


def _kl_inputs(shape, dtype, variant, device, gen):
    x = torch.log_softmax(torch.randn(shape, generator=gen, device=device) * 2.0, -1)
    t = torch.softmax(torch.randn(shape, generator=gen, device=device) * 2.0, -1)
    if "log_target" in variant:
        t = t.log()
    if "zeros" in variant:
        t = torch.where(torch.rand(shape, generator=gen, device=device) < ZERO_FRACTION, 0.0, t)
    return {"input": x.to(dtype), "target": t.to(dtype)}


def _kl_torch(x, t, reduction="mean", log_target=False):
    return F.kl_div(x, t, reduction=reduction, log_target=log_target)


def _kl_lossfuse(fn, x, t, *, backend, reduction="mean", log_target=False):
    return fn(x, t, reduction=reduction, log_target=log_target, backend=backend)


LOSSES.update({
    e.key: e
    for e in [
        LossEntry(
            key="kl_div", title="kl_div", lossfuse_name="kl_div",
            make_inputs=_kl_inputs, torch_fn=_kl_torch, lossfuse_fn=_kl_lossfuse,
            counted_bytes=_regression_bytes, bytes_formula=REGRESSION_FORMULA,
            variants={"": "torch's defaults (reduction mean)",
                      "batchmean, zeros": f"batchmean, {ZERO_FRACTION:.0%} of the target exactly 0",
                      "log_target, sum": "log_target=True, reduction sum"},
            options={"batchmean, zeros": {"reduction": "batchmean"},
                     "log_target, sum": {"reduction": "sum", "log_target": True}},
        ),
    ]
})


# ---------------------------------------------------------------------------------------------------
# Linear + distillation (lossfuse.linear_distillation_loss): student hidden states (N, H) and lm head
# (V, H), teacher hidden states (N, H) and lm head (V, H); shape (N, H, V). The student's two require
# grad. The (N, V) logits of both are intermediates: the memory reference is one of them, as for lce.
# ---------------------------------------------------------------------------------------------------


def _ldistill_inputs(shape, dtype, variant, device, gen):
    n, h, v = shape
    return {"input": _randn((n, h), dtype, device, gen),
            "linear_weight": _randn((v, h), dtype, device, gen, scale=2.0 / math.sqrt(h)),
            "teacher_hidden": _randn((n, h), dtype, device, gen),
            "teacher_weight": _randn((v, h), dtype, device, gen, scale=2.0 / math.sqrt(h))}


def _ldistill_torch(x, w, xt, wt):
    return _distill_torch(F.linear(x, w), F.linear(xt, wt))


def _ldistill_lossfuse(fn, x, w, xt, wt, *, backend):
    return fn(x, w, xt, wt, backend=backend)


def _ldistill_bytes(shape, dtype, variant, mode):
    n, h, v = shape
    b = itemsize(dtype)
    return _count(2 * (n * h + v * h) * b, (n * h + v * h) * b, mode)


def _ldistill_flops(shape, dtype, variant, mode):
    """Both projections forward, the student's two gradient matmuls backward, 2*N*H*V each."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    n, h, v = shape
    return {"fwd": 2, "bwd": 4, "fwd+bwd": 4}[mode] * 2 * n * h * v


LDISTILL_FORMULA = ("fwd: 2*(N*H + V*H)*b;  bwd, fwd+bwd: 3*(N*H + V*H)*b  (student and teacher hidden states "
                    "(N, H) and heads (V, H), b bytes each; the student's gradients written once; the (N, V) "
                    "logits are not counted). The matmul FLOPs dominate: GFLOP/s is the lens")
LDISTILL_FLOPS_FORMULA = ("fwd: 2 x 2*N*H*V;  bwd, fwd+bwd: 4 x 2*N*H*V  (both projections, then the student's "
                          "two gradient matmuls)")

LOSSES.update({
    e.key: e
    for e in [
        LossEntry(
            key="ldistill", title="linear + distillation", lossfuse_name="linear_distillation_loss",
            make_inputs=_ldistill_inputs, torch_fn=_ldistill_torch, lossfuse_fn=_ldistill_lossfuse,
            counted_bytes=_ldistill_bytes, bytes_formula=LDISTILL_FORMULA,
            grad_inputs=("input", "linear_weight"),
            size_name="N*H*V (tokens, hidden, vocabulary)",
            mem_ref_bytes=_lce_logits_bytes, mem_ref_name="one full logits tensor (N*V*b)",
            counted_flops=_ldistill_flops, flops_formula=LDISTILL_FLOPS_FORMULA, anchor="liger",
            lossfuse_notes={"fwd+bwd": "gradients during the forward pass (three chunk-sized buffers)"},
        ),
    ]
})


def lossfuse_function(entry: LossEntry):
    """The lossfuse function of ``entry``, or None where this lossfuse does not have it (yet)."""
    import importlib

    import lossfuse

    module, _, name = entry.lossfuse_name.rpartition(".")
    if module:  # a submodule with optional dependencies (lossfuse.transformers): None when they are missing
        try:
            return getattr(importlib.import_module(f"lossfuse.{module}"), name, None)
        except ImportError:
            return None
    return getattr(lossfuse, entry.lossfuse_name, None)
