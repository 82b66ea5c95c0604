"""lossfuse under a Hugging Face transformers causal language model, one call per model instance.

    import lossfuse.transformers
    model = AutoModelForCausalLM.from_pretrained(...)
    lossfuse.transformers.apply(model)                     # fused lm_head + cross-entropy in training
    lossfuse.transformers.apply(model, fused_linear=False) # or: lossfuse's cross-entropy on the logits
    lossfuse.transformers.remove(model)                    # back to transformers' own forward and loss

Only the instance given is patched (two instance attributes, ``forward`` and ``_loss_function``),
never the class or the library, and :func:`remove` puts back exactly what was there.

How the fused path works without a copy of each family's forward: while a training forward with
labels runs, the model's ``lm_head`` submodule is swapped for a stand-in that records the last hidden
state (already sliced by ``logits_to_keep``) and returns a one-column placeholder instead of the
logits. transformers' own forward then runs as written -- the base model, the soft-cap applied to the
placeholder, ``self.loss_function(...)`` with the forward's keyword arguments, any auxiliary loss the
family adds -- and our loss function computes the loss from the recorded hidden state with
:func:`lossfuse.linear_cross_entropy`, the soft-cap inside the kernel. The placeholder is checked (once
per model and soft-cap value) to have gone through exactly ``config.final_logit_softcapping`` and
nothing else, so a family that rescales or otherwise transforms its logits is refused instead of
silently trained on the wrong loss.

Importing :mod:`lossfuse` never imports transformers; this module needs it.
"""

from __future__ import annotations

import contextlib
import inspect
import types
import typing
import warnings

try:
    import transformers as _hf
    from transformers import PreTrainedModel as _PreTrainedModel
except ImportError as _err:  # pragma: no cover - exercised by a test that hides transformers
    raise ImportError(
        "lossfuse.transformers needs Hugging Face transformers: pip install 'transformers>=5.0,<6' "
        "(or pip install 'lossfuse[transformers]'), next to the torch you already have"
    ) from _err

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend
from .functional import cross_entropy, linear_cross_entropy

__all__ = ["apply", "remove", "is_applied"]

_PATCH_ATTR = "_lossfuse_patch"


class _Missing:
    """Marks an instance attribute that did not exist before apply(); one object through copies and
    pickles of a patched model (compared with ``is``)."""

    def __repr__(self):
        return "<missing>"

    def __reduce__(self):
        return "_MISSING"

    def __deepcopy__(self, memo):
        return self


_MISSING = _Missing()
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# The placeholder the stand-in lm_head returns: well inside tanh's linear range for any soft-cap, and
# not a fixed point of the scalings families apply to logits (x * s, x / s).
_PROBE_VALUE = 0.75

# The loss keywords transformers' ForCausalLMLoss reads; all of them are honoured.
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def _model_kwargs() -> frozenset:
    """Keywords a causal LM's forward hands on to its base model (attention and output options) and
    also passes to ``self.loss_function``, where transformers' own loss ignores them, as we do."""
    names = set()
    for where, name in (("transformers.utils.generic", "TransformersKwargs"),
                        ("transformers.modeling_flash_attention_utils", "FlashAttentionKwargs")):
        try:
            module = __import__(where, fromlist=[name])
            names.update(typing.get_type_hints(getattr(module, name)).keys())
        except Exception:  # noqa: BLE001 -- an older or newer layout: fall back to the names below
            pass
    # Present in every transformers 4.4x-5.x release, whatever the TypedDicts are called there.
    names.update(("output_attentions", "output_hidden_states", "output_router_logits", "cu_seq_lens_q",
                  "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids", "is_causal", "seq_idx",
                  "cache_position", "return_dict"))
    return frozenset(names - set(_LOSS_KWARGS))


_IGNORED_KWARGS = _model_kwargs()


class _Patch:
    """What :func:`apply` changed on one model, and the state of the fused forward running on it."""

    def __init__(self, fused_linear: bool, backend: str, saved: dict, signature):
        self.fused_linear = fused_linear
        self.backend = backend
        self.saved = saved  # instance attribute -> its value before apply (or _MISSING)
        self.signature = signature
        self.capture = None  # the _Capture of the fused forward running now
        self.lm_head = None  # ... and the lm_head it stands in for
        self.verified = _MISSING  # the soft-cap value the forward was last checked against
        self.warned_hooks = False


class _Capture(nn.Module):
    """Stands in for ``lm_head`` during a fused training forward: records the hidden state and returns
    a one-column placeholder, so the (tokens, vocab) logits are never formed."""

    def __init__(self):
        super().__init__()
        self.hidden = None
        self.probe = None
        self.calls = 0
        self.loss_calls = 0
        self.logits_seen = None

    def forward(self, hidden_states):
        self.calls += 1
        self.hidden = hidden_states
        self.probe = hidden_states.new_full(hidden_states.shape[:-1] + (1,), _PROBE_VALUE).detach()
        return self.probe


def _float32_loss(t: torch.Tensor):
    """transformers' loss of fp16/bf16 logits is float32 (it upcasts a copy of the logits). lossfuse
    returns a float32 loss of low-precision input under autocast without that copy; outside autocast
    we enter one in the input's own dtype, which changes nothing else about the computation."""
    if t.dtype in _LOW_PRECISION and not torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, dtype=t.dtype)
    return contextlib.nullcontext()


def _shifted_targets(labels, shift_labels, ignore_index):
    # Position t predicts token t + 1; the last position has no target (transformers' padding).
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    return shift_labels.reshape(-1)


def _divide(loss, num_items_in_batch):
    # fixed_cross_entropy's rule: the micro-batch's sum over the whole accumulated batch's items.
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _check_kwargs(kwargs) -> None:
    unknown = sorted(k for k in kwargs if k not in _IGNORED_KWARGS)
    if unknown:
        raise TypeError(
            f"lossfuse.transformers: the loss got keyword argument(s) {unknown} that it does not "
            f"implement; it honours {list(_LOSS_KWARGS)} (and ignores the model's attention/output "
            f"options, as transformers' ForCausalLMLoss does). Call lossfuse.transformers.remove(model) "
            f"to use transformers' own loss."
        )


class _CausalLMLoss:
    """``model.loss_function`` of a patched model: transformers' ForCausalLMLoss semantics (label
    shift, ``ignore_index``, ``shift_labels``, ``num_items_in_batch``; mean otherwise), computed by
    lossfuse -- from the recorded hidden state during a fused forward, from the logits otherwise."""

    def __init__(self, model):
        self._model = model

    def __call__(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                 shift_labels=None, **kwargs):
        _check_kwargs(kwargs)
        patch = self._model.__dict__.get(_PATCH_ATTR)
        capture = patch.capture if patch is not None else None
        reduction = "mean" if num_items_in_batch is None else "sum"
        if capture is not None:
            capture.loss_calls += 1
            capture.logits_seen = logits
            loss = _fused_loss(self._model, patch, capture, logits, labels, vocab_size, ignore_index,
                               shift_labels, reduction)
        else:
            if logits.shape[-1] != vocab_size:
                raise ValueError(f"lossfuse.transformers: logits have {logits.shape[-1]} columns, the "
                                 f"model's vocab_size is {vocab_size}")
            target = _shifted_targets(labels, shift_labels, ignore_index).to(logits.device)
            with _float32_loss(logits):
                loss = cross_entropy(logits.reshape(-1, vocab_size), target, ignore_index=ignore_index,
                                     reduction=reduction, backend=patch.backend if patch else "auto")
        return loss if num_items_in_batch is None else _divide(loss, num_items_in_batch)


def _softcap(model):
    cap = getattr(model.config, "final_logit_softcapping", None)
    return None if cap is None or cap == 0 else float(cap)


def _fused_loss(model, patch, capture, logits, labels, vocab_size, ignore_index, shift_labels, reduction):
    name = type(model).__name__
    if capture.calls != 1:
        raise RuntimeError(f"lossfuse.transformers: {name}'s forward called lm_head {capture.calls} times "
                           f"before its loss; the fused path supports one call. Use fused_linear=False.")
    lm_head = patch.lm_head
    softcap = _softcap(model)
    if patch.verified is _MISSING or patch.verified != softcap:
        # What reached the loss must be the placeholder through the config's soft-cap and nothing else.
        expected = capture.probe
        if softcap is not None:
            expected = torch.tanh(expected / softcap) * softcap
        ok = (isinstance(logits, torch.Tensor) and logits.shape == expected.shape
              and bool(torch.allclose(logits.detach().float(), expected.float(), rtol=1e-2, atol=0.0)))
        if not ok:
            raise ValueError(
                f"lossfuse.transformers: {name}'s forward transforms the lm_head output in a way the fused "
                f"path does not reproduce (only config.final_logit_softcapping is fused into the kernel). "
                f"Use lossfuse.transformers.apply(model, fused_linear=False) for this model."
            )
        patch.verified = softcap
    if lm_head.weight.shape[0] != vocab_size:
        raise ValueError(f"lossfuse.transformers: lm_head has {lm_head.weight.shape[0]} outputs, the loss's "
                         f"vocab_size is {vocab_size}; the fused path needs them equal")
    hidden = capture.hidden
    target = _shifted_targets(labels, shift_labels, ignore_index).to(hidden.device)
    with _float32_loss(hidden):
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), lm_head.weight, target,
                                    linear_bias=lm_head.bias, reduction=reduction, ignore_index=ignore_index,
                                    softcap=softcap, backend=patch.backend)


def _plain_linear(module) -> bool:
    # A LoRA, quantised or hook-wrapped head computes something else than x @ W.T + b from .weight.
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and "forward" not in module.__dict__)


class _PatchedForward:
    """``model.forward`` of a model patched with ``fused_linear=True``; reports the original's
    signature, which transformers inspects (Trainer's loss-kwargs check, ``generate``'s inputs)."""

    def __init__(self, model):
        self._model = model

    @property
    def _original(self):
        # Looked up at each call rather than kept as a bound method, so that copy.deepcopy and pickle
        # of a patched model see only plain references.
        model = self._model
        saved = model.__dict__[_PATCH_ATTR].saved["forward"]
        return types.MethodType(type(model).forward, model) if saved is _MISSING else saved

    @property
    def __signature__(self):
        return inspect.signature(self._original)

    def __call__(self, *args, **kwargs):
        model = self._model
        patch = model.__dict__[_PATCH_ATTR]
        if not model.training:
            return self._original(*args, **kwargs)
        bound = patch.signature.bind_partial(*args, **kwargs).arguments
        labels = bound.get("labels", kwargs.get("labels"))
        if labels is None:
            return self._original(*args, **kwargs)
        lm_head = model._modules.get("lm_head")
        if not _plain_linear(lm_head):
            raise TypeError(
                f"lossfuse.transformers: {type(model).__name__}.lm_head is now {type(lm_head).__name__}, not a "
                f"plain torch.nn.Linear; the fused path reads its weight directly. remove() and apply again "
                f"with fused_linear=False."
            )
        if (lm_head._forward_hooks or lm_head._forward_pre_hooks) and not patch.warned_hooks:
            patch.warned_hooks = True
            warnings.warn("lossfuse.transformers: lm_head has forward hooks; they do not run in a fused "
                          "training forward (lm_head is never called: the logits are not formed)",
                          stacklevel=2)
        if patch.capture is not None:
            raise RuntimeError("lossfuse.transformers: a fused forward of this model is already running "
                               "(re-entrant or concurrent calls are not supported)")
        capture = _Capture()
        patch.capture, patch.lm_head = capture, lm_head
        model._modules["lm_head"] = capture
        try:
            out = self._original(*args, **kwargs)
        finally:
            model._modules["lm_head"] = lm_head
            patch.capture, patch.lm_head = None, None
        if capture.loss_calls != 1:
            raise RuntimeError(
                f"lossfuse.transformers: {type(model).__name__}'s forward computed its loss without "
                f"model.loss_function ({capture.loss_calls} calls); the fused path cannot apply to it."
            )
        return _drop_logits(out, capture.logits_seen)


def _drop_logits(out, logits):
    if isinstance(out, _hf.utils.ModelOutput):
        # ModelOutput keeps its keys in a dict that setting a field to None does not update.
        return type(out)(**{k: v for k, v in out.items() if k != "logits"})
    if isinstance(out, tuple):  # return_dict=False: transformers leaves None fields out of the tuple
        return type(out)(v for v in out if v is not logits)
    raise TypeError(f"lossfuse.transformers: unexpected forward output {type(out).__name__}")


def _source_of_forward(cls):
    try:
        return inspect.getsource(inspect.unwrap(cls.forward))
    except (OSError, TypeError):
        return None


def _check_model(model, fused_linear: bool) -> None:
    if not isinstance(model, _PreTrainedModel):
        raise TypeError(f"lossfuse.transformers.apply expects a transformers PreTrainedModel (a *ForCausalLM); "
                        f"got {type(model).__name__}")
    name = type(model).__name__
    # loss_type comes from the class name; a user's subclass of a *ForCausalLM may have none.
    causal = any(c.__name__.endswith("ForCausalLM") for c in type(model).__mro__)
    if (not causal or getattr(model, "loss_type", None) not in (None, "ForCausalLM")
            or getattr(model.config, "is_encoder_decoder", False)):
        raise TypeError(f"lossfuse.transformers.apply patches decoder-only *ForCausalLM models; {name} is not one "
                        f"(loss_type={getattr(model, 'loss_type', None)!r})")
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
        raise ValueError(f"lossfuse.transformers: {name} has no base model attribute "
                         f"(base_model_prefix={prefix!r}); it does not have transformers' usual structure")
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None:
        raise ValueError(f"lossfuse.transformers: {name} has no lm_head attribute")
    vocab = getattr(model.config, "vocab_size", None)
    if not isinstance(vocab, int):
        raise ValueError(f"lossfuse.transformers: {name}.config has no vocab_size")
    source = _source_of_forward(type(model))
    if source is not None and "self.loss_function" not in source:
        raise ValueError(f"lossfuse.transformers: {name}.forward does not compute its loss through "
                         f"self.loss_function, so its loss cannot be replaced")
    if fused_linear:
        if not _plain_linear(lm_head):
            raise TypeError(f"lossfuse.transformers: {name}.lm_head is {type(lm_head).__name__}, not a plain "
                            f"torch.nn.Linear (a LoRA, quantised or hooked head?); fused_linear=True reads its "
                            f"weight directly. Use fused_linear=False.")
        if lm_head.out_features != vocab:
            raise ValueError(f"lossfuse.transformers: {name}.lm_head has {lm_head.out_features} outputs but "
                             f"config.vocab_size is {vocab}; fused_linear=True needs them equal")
        if source is not None and "self.lm_head(" not in source:
            raise ValueError(f"lossfuse.transformers: {name}.forward does not call self.lm_head; "
                             f"fused_linear=True cannot apply")


def apply(model, *, fused_linear: bool = True, backend: str = "auto"):
    """Put lossfuse under one transformers causal-LM instance (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
    ``Gemma2ForCausalLM``, ... -- any ``*ForCausalLM`` with a base model, ``lm_head`` and
    ``config.vocab_size``). Returns the model.

    ``fused_linear=False``: the model's loss (``model.loss_function``) becomes
    :func:`lossfuse.cross_entropy` on its logits, which reads fp16/bf16 logits as they are (transformers
    makes a float32 copy of them). The forward is transformers' own.

    ``fused_linear=True`` (default): in training mode (``model.training``) with ``labels`` given, the
    last hidden state goes through :func:`lossfuse.linear_cross_entropy` with the ``lm_head`` weight
    (and bias), ``config.final_logit_softcapping`` inside the kernel, so the (tokens, vocab) logits
    never exist. **The output's ``logits`` is then ``None``** (with ``return_dict=False`` the tuple has
    no logits entry, as for any ``None`` field), ``lm_head`` is not called and its hooks do not run.
    Without labels (generation) or in eval mode the forward is transformers' own; with labels in eval
    mode its loss is computed as with ``fused_linear=False``.

    The loss follows transformers' ``ForCausalLMLoss``: labels shifted by one, ``ignore_index`` (-100),
    ``shift_labels`` when given, ``num_items_in_batch`` (Trainer's gradient accumulation: the
    micro-batch's sum divided by it), mean otherwise; the loss is float32. ``logits_to_keep`` slices
    the hidden state as it would the logits. Other keywords the forward passes to the loss are the
    model's own options (ignored by the loss, as transformers' loss does); an unknown one raises
    ``TypeError``.

    ``backend`` is lossfuse's (``"auto"``, ``"cpu"``, ``"triton"``, ``"reference"``), as for
    :func:`lossfuse.cross_entropy`.

    Only this instance changes; :func:`remove` restores it exactly. Raises ``TypeError``/``ValueError``
    for a model it cannot patch, ``RuntimeError`` if the model is already patched.
    """
    if not isinstance(fused_linear, bool):
        raise TypeError(f"lossfuse.transformers.apply: fused_linear must be a bool; got {fused_linear!r}")
    if isinstance(model, nn.Module) and _PATCH_ATTR in model.__dict__:
        raise RuntimeError("lossfuse.transformers.apply: this model is already patched; call "
                           "lossfuse.transformers.remove(model) first")
    _backend.check_backend_name(backend)
    _check_model(model, fused_linear)
    names = ("forward", "_loss_function") if fused_linear else ("_loss_function",)
    saved = {n: model.__dict__.get(n, _MISSING) for n in names}
    # What runs now: the class's forward, or a wrapper someone installed on the instance.
    patch = _Patch(fused_linear, backend, saved, inspect.signature(model.forward))
    model.__dict__[_PATCH_ATTR] = patch
    model.__dict__["_loss_function"] = _CausalLMLoss(model)
    if fused_linear:
        model.__dict__["forward"] = _PatchedForward(model)
    return model


def remove(model):
    """Undo :func:`apply` on ``model``: its ``forward`` and ``loss_function`` are what they were before
    (the same objects), and nothing of lossfuse is left on it. Returns the model."""
    patch = model.__dict__.get(_PATCH_ATTR) if isinstance(model, nn.Module) else None
    if patch is None:
        raise ValueError(f"lossfuse.transformers.remove: {type(model).__name__} is not patched by "
                         f"lossfuse.transformers.apply")
    if patch.capture is not None:
        raise RuntimeError("lossfuse.transformers.remove: called during a fused forward")
    ours = {"_loss_function": _CausalLMLoss, "forward": _PatchedForward}
    for name in patch.saved:
        if not isinstance(model.__dict__.get(name), ours[name]):
            # Something (a user, accelerate's hooks) replaced it after apply(): putting back what was
            # there before apply() would silently drop that.
            raise RuntimeError(f"lossfuse.transformers.remove: model.{name.lstrip('_')} was replaced after "
                               f"apply(); restore it first, then call remove()")
    for name, value in patch.saved.items():
        if value is _MISSING:
            model.__dict__.pop(name, None)
        else:
            model.__dict__[name] = value
    del model.__dict__[_PATCH_ATTR]
    return model


def is_applied(model) -> bool:
    """Whether :func:`apply` patched ``model`` (and :func:`remove` has not undone it)."""
    return isinstance(model, nn.Module) and _PATCH_ATTR in model.__dict__
