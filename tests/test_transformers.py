"""lossfuse.transformers: lossfuse under Hugging Face causal LMs, checked against transformers' own loss.

Tiny random models built in code (no hub access), trained side by side from the same weights on the
same batches: the patched model's loss curve must follow the unpatched one. One thread: these models
are far too small for a parallel region to pay, and on a loaded 2-core machine each region waits for
CPUs other processes hold.
"""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
hf = pytest.importorskip("transformers")

import lossfuse  # noqa: E402
import lossfuse.transformers as lt  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

V = 256
STEPS = 25
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64)
# family -> (model class, config class, config extras). Gemma2's soft-cap is set low so that the tanh
# bends the logits of a tiny random model (at the default 30 it would be the identity here).
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=16)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(head_dim=16, final_logit_softcapping=2.0)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(head_dim=16)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}
BF16_ULP = 2.0 ** -8  # bf16's relative spacing just above a power of two: 8 significant bits


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(family: str, **overrides):
    cls_name, cfg_name, extra = FAMILIES[family]
    cls, cfg_cls = getattr(hf, cls_name, None), getattr(hf, cfg_name, None)
    if cls is None or cfg_cls is None:
        pytest.skip(f"transformers {hf.__version__} has no {cls_name}")
    cfg = cfg_cls(**{**COMMON, **extra, **overrides})
    return cls(cfg)


def batch(gen, B=4, T=16):
    """A synthetic language (next token = 3 * previous + 1 mod V, 20% noise), with labels masked
    unevenly across rows so that a mean of micro-batch means differs from the batch's mean."""
    t = torch.empty(B, T, dtype=torch.long)
    t[:, 0] = torch.randint(0, V, (B,), generator=gen)
    for i in range(1, T):
        noise = torch.rand(B, generator=gen) < 0.2
        t[:, i] = torch.where(noise, torch.randint(0, V, (B,), generator=gen), (t[:, i - 1] * 3 + 1) % V)
    labels = t.clone()
    labels[0, :5] = -100
    labels[B - 1, -3:] = -100
    return t, labels


def train(model, steps=STEPS, accumulate=False, seed=1):
    """AdamW steps on fresh batches; with ``accumulate``, two micro-batches per step and
    ``num_items_in_batch`` as Trainer passes it (the shifted labels kept in the whole batch)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        ids, labels = batch(gen)
        opt.zero_grad(set_to_none=True)
        if accumulate:
            items = (labels[:, 1:] != -100).sum()
            total = 0.0
            for rows in (slice(0, 2), slice(2, 4)):
                out = model(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=items)
                out.loss.backward()
                total += out.loss.item()
            losses.append(total)
        else:
            out = model(input_ids=ids, labels=labels)
            assert out.loss.dtype == torch.float32  # transformers' loss is float32 for every model dtype
            out.loss.backward()
            losses.append(out.loss.item())
        opt.step()
    return torch.tensor(losses, dtype=torch.float64)


def rel(a, b):
    return ((a - b).abs() / b.abs()).max().item()


def assert_grads_close(grads, ref, what, tol=1e-5):
    """Every parameter's gradient within ``tol`` of the reference's, relative to its norm (fp32 sums in
    another order land near 1e-7)."""
    assert grads.keys() == ref.keys(), what
    for name, g in grads.items():
        err = ((g - ref[name]).norm() / ref[name].norm().clamp_min(1e-30)).item()
        assert err <= tol, (what, name, err)


def loss_and_grads(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    model.train()
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------------
# Every family: loss curves in both modes, fp32 with and without accumulation, bf16; remove()
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(family):
    torch.manual_seed(0)
    base = make_model(family)
    ref = {acc: train(copy.deepcopy(base), accumulate=acc) for acc in (False, True)}
    assert ref[False][-1] < 0.9 * ref[False][0], "the reference model did not learn: the test would be weak"
    ref_bf16 = train(copy.deepcopy(base).to(torch.bfloat16))
    # How far bf16 training itself moves transformers' own curve from its fp32 one: the size of the
    # rounding bf16 brings to this curve, which two bf16 implementations cannot be held closer than.
    bf16_noise = rel(ref_bf16, ref[False])

    gen = torch.Generator().manual_seed(7)
    ids, labels = batch(gen)
    ref_out, ref_grads = loss_and_grads(copy.deepcopy(base), ids, labels)
    for fused in (False, True):
        for acc in (False, True):
            model = lt.apply(copy.deepcopy(base), fused_linear=fused)
            got = train(model, accumulate=acc)
            assert rel(got, ref[acc]) <= 1e-4, (family, fused, acc, got, ref[acc])

        # One step's gradients, every parameter (the lm_head weight through the fused kernel).
        out, grads = loss_and_grads(lt.apply(copy.deepcopy(base), fused_linear=fused), ids, labels)
        assert (out.logits is None) == fused
        assert grads.keys() == ref_grads.keys()
        assert_grads_close(grads, ref_grads, (family, fused))

        # bf16: the first loss within one bf16 ulp (both compute it in fp32 from bf16 logits; transformers
        # rounds its soft-cap's steps to bf16, the kernel does not); the curve no farther from
        # transformers' bf16 curve than that is from its fp32 one, and at least 4 ulps of room.
        got_bf16 = train(lt.apply(copy.deepcopy(base).to(torch.bfloat16), fused_linear=fused))
        assert abs(got_bf16[0] - ref_bf16[0]) / ref_bf16[0] <= BF16_ULP, (family, fused, got_bf16, ref_bf16)
        assert rel(got_bf16, ref_bf16) <= max(4 * BF16_ULP, bf16_noise), (family, fused, got_bf16, ref_bf16)

        # remove(): the model is transformers' own again, bit for bit.
        never = copy.deepcopy(base)
        model = lt.apply(copy.deepcopy(base), fused_linear=fused)
        loss_and_grads(model, ids, labels)
        assert lt.remove(model) is model
        assert not lt.is_applied(model)
        for attr in ("forward", "_loss_function", "_lossfuse_patch"):
            assert attr not in model.__dict__, attr
        assert model.loss_function is ForCausalLMLoss
        assert type(model.lm_head) is torch.nn.Linear
        a, ga = loss_and_grads(model, ids, labels)
        b, gb = loss_and_grads(never, ids, labels)
        assert torch.equal(a.loss, b.loss) and torch.equal(a.logits, b.logits)
        assert all(torch.equal(ga[n], gb[n]) for n in gb)


# ---------------------------------------------------------------------------------------------------
# The fused path: no logits, lm_head never called; transformers' forward where there are no labels
# ---------------------------------------------------------------------------------------------------


def _count_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda mod, args: calls.append(1))
    return calls


def test_fused_never_calls_lm_head_in_training():
    torch.manual_seed(0)
    base = make_model("llama")
    model = lt.apply(copy.deepcopy(base))
    calls = _count_calls(model.lm_head)
    ids, labels = batch(torch.Generator().manual_seed(0))
    model.train()
    with pytest.warns(UserWarning, match="hooks"):
        out = model(input_ids=ids, labels=labels)
    assert out.logits is None and "logits" not in out.keys()
    assert calls == []
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    # The same hook counts a call when the model is transformers' own: the counter can fail.
    own = copy.deepcopy(base)
    own_calls = _count_calls(own.lm_head)
    own.train()
    own(input_ids=ids, labels=labels)
    assert own_calls == [1]

    # No labels, or eval mode: transformers' forward, the logits as they are.
    model.eval()
    own.eval()
    with torch.no_grad():
        for kw in ({}, {"labels": labels}):
            a, b = model(input_ids=ids, **kw), own(input_ids=ids, **kw)
            assert torch.equal(a.logits, b.logits)
            if kw:
                assert abs(a.loss.item() - b.loss.item()) <= 1e-6 * b.loss.item()
    model.train()
    own.train()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, own(input_ids=ids).logits)


def test_generate_unchanged():
    torch.manual_seed(0)
    base = make_model("qwen2")
    prompt = torch.randint(0, V, (2, 5))
    own = base.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for fused in (False, True):
        model = lt.apply(copy.deepcopy(base), fused_linear=fused)
        assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), own)


@pytest.mark.parametrize("fused", [False, True])
def test_shift_labels_logits_to_keep_and_tuples(fused):
    torch.manual_seed(0)
    base = make_model("gemma2")
    model = lt.apply(copy.deepcopy(base), fused_linear=fused)
    ids, labels = batch(torch.Generator().manual_seed(3))
    keep = 6
    shift = labels[:, -keep:].clone()
    shift[1, 2] = -100
    for kw in (dict(shift_labels=shift, logits_to_keep=keep), dict(shift_labels=torch.roll(labels, -1, 1)),
               dict(ignore_index=5), dict(num_items_in_batch=37), dict(num_items_in_batch=torch.tensor(37))):
        if "ignore_index" in kw:
            lab = torch.where(labels == -100, 5, labels)
        else:
            lab = labels
        a, ga = loss_and_grads(model, ids, lab, **kw)
        b, gb = loss_and_grads(base, ids, lab, **kw)
        assert abs(a.loss.item() - b.loss.item()) <= 1e-6 * b.loss.item(), kw
        assert_grads_close(ga, gb, kw)
    # return_dict=False: transformers' tuple, without the logits when they are not formed.
    t = model(input_ids=ids, labels=labels, return_dict=False)
    u = base(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(t, tuple) and len(t) == len(u) - int(fused)
    assert abs(t[0].item() - u[0].item()) <= 1e-6 * u[0].item()


def test_low_precision_logits_are_not_copied_to_float32():
    """fused_linear=False on bf16 logits: no (tokens, vocab) float32 tensor is made while the loss is
    computed (transformers' own loss makes one: the detector is checked on it too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fp32Logits(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.seen = numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.numel:
                    self.seen.append(str(func))
            return out

    torch.manual_seed(0)
    model = make_model("llama").to(torch.bfloat16)
    ids, labels = batch(torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits.detach().requires_grad_(True)
    seen = {}
    for name, loss_fn in (("transformers", ForCausalLMLoss),
                          ("lossfuse", lt.apply(model, fused_linear=False).loss_function)):
        mode = Fp32Logits(logits[..., :-1, :].numel())
        with mode:
            loss = loss_fn(logits, labels, V)
            loss.backward()
        seen[name] = mode.seen
        assert loss.dtype == torch.float32
    assert seen["transformers"], "the detector missed transformers' float32 copy"
    assert seen["lossfuse"] == [], seen["lossfuse"]


# ---------------------------------------------------------------------------------------------------
# Trainer, end to end
# ---------------------------------------------------------------------------------------------------


def test_trainer_end_to_end(tmp_path):
    torch.manual_seed(0)
    base = make_model("llama")
    gen = torch.Generator().manual_seed(5)
    rows = []
    for _ in range(4):
        ids, labels = batch(gen)
        rows += [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]

    def run(model, name):
        args = hf.TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no",
            report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
        trainer = hf.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        assert trainer.model_accepts_loss_kwargs  # so it passes num_items_in_batch to the model
        return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h], dtype=torch.float64)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        own = run(copy.deepcopy(base), "own")
        assert len(own) == 4
        for fused in (False, True):
            got = run(lt.apply(copy.deepcopy(base), fused_linear=fused), f"fused{fused}")
            assert rel(got, own) <= 1e-4, (fused, got, own)


# ---------------------------------------------------------------------------------------------------
# Errors, optional import
# ---------------------------------------------------------------------------------------------------


def test_errors():
    torch.manual_seed(0)
    base = make_model("llama")
    ids, labels = batch(torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        lt.apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="ForCausalLM"):
        lt.apply(hf.LlamaForSequenceClassification(base.config))
    with pytest.raises(TypeError, match="fused_linear"):
        lt.apply(copy.deepcopy(base), fused_linear="yes")
    with pytest.raises(ValueError, match="backend"):
        lt.apply(copy.deepcopy(base), backend="gpu")

    model = lt.apply(copy.deepcopy(base))
    with pytest.raises(RuntimeError, match="already patched"):
        lt.apply(model)
    with pytest.raises(TypeError, match="frobnicate"):
        model(input_ids=ids, labels=labels, frobnicate=1)
    lt.remove(model)
    with pytest.raises(ValueError, match="not patched"):
        lt.remove(model)

    # A head that is not a plain Linear: refused by the fused path, fine on the logits.
    odd = copy.deepcopy(base)
    odd.lm_head = torch.nn.Sequential(odd.lm_head)
    with pytest.raises(TypeError, match="plain torch.nn.Linear"):
        lt.apply(odd)
    lt.apply(odd, fused_linear=False)
    assert torch.isfinite(odd(input_ids=ids, labels=labels).loss)
    model = lt.apply(copy.deepcopy(base))
    model.lm_head = torch.nn.Sequential(model.lm_head)  # swapped after apply: refused at call time
    with pytest.raises(TypeError, match="plain torch.nn.Linear"):
        model.train()(input_ids=ids, labels=labels)

    # lm_head wider than the vocabulary (padded heads): the fused path would include the padding.
    wide = copy.deepcopy(base)
    wide.lm_head = torch.nn.Linear(32, V + 8, bias=False)
    with pytest.raises(ValueError, match="vocab_size"):
        lt.apply(wide)

    class Scaled(hf.LlamaForCausalLM):
        """A family that rescales its logits before the loss: the fused path must refuse it."""

        def forward(self, input_ids=None, labels=None, **kwargs):
            h = self.model(input_ids=input_ids).last_hidden_state
            logits = self.lm_head(h) * 0.5
            loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            return hf.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    scaled = Scaled(base.config)
    scaled.load_state_dict(base.state_dict())
    lt.apply(scaled)
    with pytest.raises(ValueError, match="fused_linear=False"):
        scaled.train()(input_ids=ids, labels=labels)
    lt.remove(scaled)
    lt.apply(scaled, fused_linear=False)  # its own scaling is kept on the logits path
    a = scaled(input_ids=ids, labels=labels).loss
    lt.remove(scaled)
    assert abs(a.item() - scaled(input_ids=ids, labels=labels).loss.item()) <= 1e-6 * a.item()

    class Inline(hf.LlamaForCausalLM):
        """Computes its loss without self.loss_function: nothing to replace."""

        def forward(self, input_ids=None, labels=None, **kwargs):
            logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            return hf.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    with pytest.raises(ValueError, match="loss_function"):
        lt.apply(Inline(base.config))


def test_remove_restores_instance_attributes_set_before():
    torch.manual_seed(0)
    model = make_model("mistral")

    def custom_loss(logits, labels, vocab_size, **kwargs):
        return ForCausalLMLoss(logits, labels, vocab_size, **kwargs) * 2

    model.loss_function = custom_loss
    lt.apply(model)
    assert model.loss_function is not custom_loss
    lt.remove(model)
    assert model.loss_function is custom_loss and model.__dict__["_loss_function"] is custom_loss

    # Replaced after apply(): remove() refuses rather than drop the newer one.
    lt.apply(model, fused_linear=False)
    model.loss_function = ForCausalLMLoss
    with pytest.raises(RuntimeError, match="replaced after"):
        lt.remove(model)


def test_copies_of_a_patched_model_are_patched_and_independent():
    import io

    torch.manual_seed(0)
    base = make_model("qwen3")
    ids, labels = batch(torch.Generator().manual_seed(2))
    model = lt.apply(copy.deepcopy(base))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert lt.is_applied(twin) and twin.forward._model is twin
        out = twin.train()(input_ids=ids, labels=labels)
        assert out.logits is None
        lt.remove(twin)
        assert lt.is_applied(model) and not lt.is_applied(twin)
        ref = base.train()(input_ids=ids, labels=labels)
        assert torch.equal(twin(input_ids=ids, labels=labels).loss, ref.loss)


def test_import_lossfuse_does_not_import_transformers():
    code = "import sys, lossfuse; lossfuse.cross_entropy; sys.exit(1 if 'transformers' in sys.modules else 0)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_import_error_names_what_to_install(monkeypatch):
    saved = sys.modules.pop("lossfuse.transformers")
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` sees when absent
    try:
        with pytest.raises(ImportError, match="pip install 'transformers"):
            importlib.import_module("lossfuse.transformers")
    finally:
        sys.modules["lossfuse.transformers"] = saved
        lossfuse.transformers = saved
