"""DTensor cases run inside the gloo worlds of tests/test_distributed.py (one 1-D device mesh over the
world): lossfuse.cross_entropy on DTensor logits against torch's own DTensor cross-entropy (under
loss_parallel() for class-sharded logits) and against single-process float64.

Each case returns a small dict (or raises); test_distributed.py turns them into pytest items.
"""

from __future__ import annotations

import contextlib
import os
import zlib

import torch

C = 13  # uneven class shards: 7 + 6 on 2 ranks, 5 + 5 + 3 on 3
ROWS = 12  # even batch shards on 2 and 3 ranks, where torch's Partial("avg") mean is exact


def _cases():
    cases = {}
    for pl in ("R", "S0", "S1"):
        for red in ("none", "mean", "sum"):
            # No ignored rows where torch is compared on batch shards: its Partial("avg") mean is exact
            # only when every shard has the same denominator.
            cases[f"{pl}-{red}"] = dict(pl=pl, reduction=red, torch=True, ignore=0.0 if pl == "S0" else 0.2)
    cases.update({
        # torch's loss_parallel() backward indexes the weights with ignore_index (an IndexError), so
        # it is compared without ignored rows; ours with them against float64.
        "S1-weight-mean": dict(pl="S1", weight=True, torch=True, ignore=0.0),
        "S1-weight-ignore-mean": dict(pl="S1", weight=True, ignore=0.3, dtype="float64"),
        "S1-weight-sum-ignore_index-is-a-class": dict(pl="S1", weight=True, reduction="sum", ignore_index=3,
                                                      dtype="float64"),
        "S1-all-none": dict(pl="S1", weight=True, eps=0.1, z_loss=1e-2, softcap=4.0, reduction="none", dtype="float64"),
        "S1-all-mean": dict(pl="S1", weight=True, eps=0.1, z_loss=1e-2, softcap=4.0, dtype="float64"),
        "S1-prob-mean": dict(pl="S1", prob=True, weight=True, eps=0.1, dtype="float64"),
        "S1-prob-none": dict(pl="S1", prob=True, softcap=3.0, reduction="none", dtype="float64"),
        "S1-spatial-none": dict(pl="S1", spatial=3, reduction="none", eps=0.1, dtype="float64"),
        "S1-bf16-mean": dict(pl="S1", dtype="bfloat16", torch=True),
        "S1-plain-target": dict(pl="S1", plain_target=True, torch=True),
        "S1-target-sharded-as-rows": dict(pl="S1", target_pl="S0", reduction="none"),
        "S1-1d-input": dict(pl="S1", one_row=True, reduction="sum", dtype="float64"),
        "S0-prob-mean": dict(pl="S0", prob=True, torch=True),
        "S0-all-mean": dict(pl="S0", weight=True, eps=0.1, z_loss=1e-2, softcap=4.0, dtype="float64"),
        # Uneven shards, ignored rows and class weights: the shards' denominators differ, so the mean
        # needs the global one (torch's Partial("avg") of local means is not the mean here).
        "S0-uneven-ignore-weight-mean": dict(pl="S0", rows=37, weight=True, ignore=0.3, dtype="float64"),
        "S2-spatial-sum": dict(pl="S2", spatial=6, reduction="sum", torch=True),
        "S2-spatial-mean": dict(pl="S2", spatial=6, ignore=0.3, dtype="float64"),
        "R-plain-target": dict(pl="R", plain_target=True, reduction="mean"),
        "R-all-sum": dict(pl="R", weight=True, eps=0.1, z_loss=1e-2, softcap=4.0, reduction="sum", dtype="float64"),
        "S0-module": dict(pl="S0", module=True, eps=0.1, weight=True, dtype="float64"),
        "S1-module": dict(pl="S1", module=True, eps=0.1, weight=True, dtype="float64"),
    })
    return cases


CASES = _cases()


def _placements(code):
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate()] if code == "R" else [Shard(int(code[1:]))]


def run(name, opts, mesh, rank, world):
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    import lossfuse
    from helpers import assert_close
    from lossfuse import reference

    gen = torch.Generator().manual_seed(zlib.crc32(f"dt-{world}-{name}".encode()))
    dtype = getattr(torch, opts.get("dtype", "float32"))
    n = opts.get("rows", ROWS)
    shape = (n, C) + ((opts["spatial"],) if "spatial" in opts else ())
    if opts.get("one_row"):
        shape = (C,)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    red, eps = opts.get("reduction", "mean"), opts.get("eps", 0.0)
    ignore_index = opts.get("ignore_index", -100)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.2 if opts.get("weight") else None
    cdim = 0 if x.dim() == 1 else 1
    if opts.get("prob"):
        y = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), cdim).to(dtype)
    else:
        y = torch.randint(0, C, shape[:cdim] + shape[cdim + 1:], generator=gen)
        if y.dim():
            y[torch.rand(y.shape, generator=gen) < opts.get("ignore", 0.2)] = ignore_index
    kw = dict(reduction=red, label_smoothing=eps)
    extra = dict(z_loss=opts.get("z_loss", 0.0), softcap=opts.get("softcap"))

    pl = _placements("S0" if opts.get("one_row") else opts["pl"])  # (C,): the classes are dim 0
    row_pl = {"R": [Replicate()], "S0": _placements("S0"), "S1": [Replicate()],
              "S2": _placements("S1")}[opts["pl"]]
    t_pl = pl if opts.get("prob") else row_pl
    if opts.get("target_pl"):
        t_pl = _placements(opts["target_pl"])
    xd = distribute_tensor(x, mesh, pl).requires_grad_()
    yd = y if opts.get("plain_target") else distribute_tensor(y, mesh, t_pl)
    wd = None if w is None else w.to(dtype)
    if opts.get("module"):
        crit = lossfuse.CrossEntropyLoss(weight=wd, ignore_index=ignore_index, return_lse=True, **kw, **extra)
        out, lse = crit(xd, yd)
    else:
        out, lse = lossfuse.cross_entropy(xd, yd, wd, ignore_index=ignore_index, return_lse=True, **kw, **extra)
    assert isinstance(out, DTensor) and isinstance(lse, DTensor)
    go_full = torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5
    go = distribute_tensor(go_full.to(out.dtype), mesh, out.placements) if red == "none" else None
    out.backward(go)
    assert isinstance(xd.grad, DTensor) and tuple(xd.grad.placements) == tuple(pl), xd.grad.placements
    want_out_pl = tuple(row_pl) if red == "none" else (
        (Partial("sum"),) if opts["pl"] in ("S0", "S2") else (Replicate(),))
    assert tuple(out.placements) == want_out_pl, f"loss placements {out.placements}, expected {want_out_pl}"

    # Single-process float64.
    ref_in = x.detach().double().requires_grad_()
    ref, ref_lse = reference.cross_entropy(ref_in, y.double() if opts.get("prob") else y, w, ignore_index,
                                           red, eps, return_lse=True, **extra)
    ref.backward(go_full if red == "none" else None)
    rtol = 1e-9 if dtype == torch.float64 else None
    assert_close(out.full_tensor(), ref, dtype, "loss", rtol=rtol)
    assert_close(lse.full_tensor(), ref_lse, dtype, "lse", rtol=rtol)
    assert_close(xd.grad.full_tensor(), ref_in.grad, dtype, "gradient", rtol=rtol)

    result = {}
    if opts.get("torch"):
        # torch's own DTensor cross-entropy: under loss_parallel() for class-sharded logits.
        tx = distribute_tensor(x, mesh, pl).requires_grad_()
        ty = distribute_tensor(y, mesh, t_pl)
        tw = None if w is None else w.to(dtype)
        ctx = loss_parallel() if opts["pl"] == "S1" else contextlib.nullcontext()
        with ctx:
            tout = F.cross_entropy(tx, ty, tw, ignore_index=ignore_index, **kw)
            tout.backward(None if go is None else distribute_tensor(go_full.to(tout.dtype), mesh, tout.placements))
        # torch's batch-sharded mean is Partial("avg") of local means; ours Partial("sum") of local
        # sums over the global denominator (lossfuse/_dtensor.py): the same value on even shards.
        if not (opts["pl"] in ("S0", "S2") and red == "mean"):
            assert tuple(tout.placements) == tuple(out.placements), (tout.placements, out.placements)
        assert tuple(tx.grad.placements) == tuple(xd.grad.placements), (tx.grad.placements, xd.grad.placements)
        assert_close(out.full_tensor(), tout.full_tensor().double(), dtype, "loss vs torch")
        assert_close(xd.grad.full_tensor(), tx.grad.full_tensor().double(), dtype, "gradient vs torch")
        result["torch_placements"] = [str(p) for p in tout.placements]
    result["placements"] = [str(p) for p in out.placements]
    return result


ERRORS = {
    # A plain target where the rows are sharded: local rows or global? torch refuses it too.
    "S0-plain-target": (ValueError, "pass the target as a DTensor"),
    "partial-logits": (NotImplementedError, "must be Shard or Replicate"),
}


def run_error(name, mesh, rank, world):
    from torch.distributed.tensor import DTensor, Partial, distribute_tensor

    import lossfuse

    exc_type, pattern = ERRORS[name]
    x = torch.randn(ROWS, C)
    y = torch.randint(0, C, (ROWS,))
    try:
        if name == "S0-plain-target":
            lossfuse.cross_entropy(distribute_tensor(x, mesh, _placements("S0")), y)
        else:
            lossfuse.cross_entropy(DTensor.from_local(x, mesh, [Partial()]), y)
    except exc_type as e:
        if pattern not in str(e):
            raise AssertionError(f"message {str(e)!r} does not contain {pattern!r}") from e
    else:
        raise AssertionError(f"no {exc_type.__name__} raised")
    return {}


# ------------------------------------------------------------------------------------------------
# Linear + cross-entropy with a sharded output layer: explicit vocab-parallel (plain tensors), a
# vocab-sharded DTensor weight (tensor parallel) and an FSDP-sharded DTensor weight (data parallel).
# ------------------------------------------------------------------------------------------------

H = 8


def _linear_cases():
    cases = {}
    for mode in ("explicit", "tp"):
        for red in ("none", "mean", "sum"):
            cases[f"{mode}-{red}"] = dict(mode=mode, reduction=red)
            cases[f"{mode}-all-{red}"] = dict(mode=mode, reduction=red, weight=True, eps=0.1, z_loss=1e-2,
                                              softcap=4.0, bias=True)
        cases[f"{mode}-prob"] = dict(mode=mode, prob=True, weight=True, eps=0.1, softcap=4.0, target_grad=True)
        cases[f"{mode}-float32"] = dict(mode=mode, dtype="float32", weight=True, eps=0.1, bias=True)
    cases.update({
        "explicit-uneven-gathered-sizes": dict(mode="explicit", uneven=True, sizes="gathered", eps=0.1),
        "explicit-one-chunk": dict(mode="explicit", chunk=None, weight=True, softcap=3.0),
        "explicit-bfloat16": dict(mode="explicit", dtype="bfloat16", eps=0.1),
        "explicit-prob-none": dict(mode="explicit", prob=True, reduction="none", z_loss=1e-2),
        "fsdp-mean": dict(mode="fsdp"),
        "fsdp-all-sum": dict(mode="fsdp", reduction="sum", weight=True, eps=0.1, z_loss=1e-2, softcap=4.0),
        "fsdp-float32": dict(mode="fsdp", dtype="float32", eps=0.1),
    })
    return cases


LINEAR_CASES = _linear_cases()


def run_linear(name, opts, mesh, rank, world):
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    import lossfuse
    from helpers import assert_close
    from lossfuse import reference
    from lossfuse.distributed import vocab_parallel_linear_cross_entropy

    mode = opts["mode"]
    dtype = getattr(torch, opts.get("dtype", "float64"))
    red, eps = opts.get("reduction", "mean"), opts.get("eps", 0.0)
    kw = dict(reduction=red, label_smoothing=eps, z_loss=opts.get("z_loss", 0.0), softcap=opts.get("softcap"))
    seed = zlib.crc32(f"lin-{world}-{name}".encode())
    gen = torch.Generator().manual_seed(seed)
    if opts.get("uneven"):
        sizes = [5 + 4 * r for r in range(world)]
    else:
        sizes = [Shard.local_shard_size_and_offset(C, world, r)[0] for r in range(world)]
    V = sum(sizes)
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    n = ROWS + 5
    W = (torch.randn(V, H, generator=gen, dtype=torch.float64) / 2).to(dtype)
    b = torch.randn(V, generator=gen, dtype=torch.float64).to(dtype) if opts.get("bias") else None
    w = torch.rand(V, generator=gen, dtype=torch.float64) + 0.2 if opts.get("weight") else None

    def data(r):  # rank r's rows in data parallel; everyone's rows otherwise
        g = torch.Generator().manual_seed(seed + 1 + (r if mode == "fsdp" else 0))
        x = (torch.randn(n, H, generator=g, dtype=torch.float64) * 2).to(dtype)
        if opts.get("prob"):
            y = torch.softmax(torch.randn(n, V, generator=g, dtype=torch.float64), 1).to(dtype)
        else:
            y = torch.randint(0, V, (n,), generator=g)
            y[torch.rand(n, generator=g) < 0.2] = -100
        return x, y

    def single(r):  # the single-process float64 loss and gradients of rank r's rows
        x, y = data(r)
        xr, Wr = x.detach().double().requires_grad_(), W.detach().double().requires_grad_()
        br = None if b is None else b.detach().double().requires_grad_()
        yr = y.detach().double().requires_grad_(bool(opts.get("target_grad"))) if opts.get("prob") else y
        out = reference.cross_entropy(F.linear(xr, Wr, br), yr, w, -100, red, eps, z_loss=kw["z_loss"],
                                      softcap=kw["softcap"])
        go = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed + 99), dtype=torch.float64) + 0.5
        out.backward(go)
        return out, go, xr.grad, Wr.grad, None if br is None else br.grad, yr.grad if opts.get("target_grad") else None

    x, y = data(rank)
    ref, go, gx_ref, gW_ref, gb_ref, gt_ref = single(rank)
    rtol = 1e-9 if dtype == torch.float64 else None
    xl = x.detach().requires_grad_()
    if mode == "explicit":
        Wl = W[start:stop].detach().requires_grad_()
        bl = None if b is None else b[start:stop].detach().requires_grad_()
        yl = y[:, start:stop].detach().requires_grad_(bool(opts.get("target_grad"))) if opts.get("prob") else y
        out = vocab_parallel_linear_cross_entropy(
            xl, Wl, yl, local_bias=bl, weight=None if w is None else w[start:stop].to(dtype),
            vocab_sizes=sizes if opts.get("sizes", "given") == "given" else None,
            chunk_size=opts.get("chunk", 4), **kw)
        out.backward(go.to(out.dtype))
        got_x, got_W, got_b = xl.grad, Wl.grad, None if bl is None else bl.grad
        got_t = yl.grad if opts.get("target_grad") else None
        cols = slice(start, stop)
    elif mode == "tp":
        xd = distribute_tensor(xl.detach(), mesh, [Replicate()]).requires_grad_()
        Wd = distribute_tensor(W, mesh, [Shard(0)]).requires_grad_()
        bd = None if b is None else distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
        yd = distribute_tensor(y, mesh, [Shard(1)] if opts.get("prob") else [Replicate()])
        if opts.get("target_grad"):
            yd = yd.detach().requires_grad_()
        out = lossfuse.linear_cross_entropy(xd, Wd, yd, linear_bias=bd, weight=None if w is None else w.to(dtype),
                                            chunk_size=4, **kw)
        assert isinstance(out, DTensor) and tuple(out.placements) == (Replicate(),), out
        out.backward(distribute_tensor(go.to(out.dtype), mesh, [Replicate()]))
        assert tuple(xd.grad.placements) == (Replicate(),) and tuple(Wd.grad.placements) == (Shard(0),)
        out = out.full_tensor()
        got_x, got_W = xd.grad.full_tensor(), Wd.grad.full_tensor()
        got_b = None if bd is None else bd.grad.full_tensor()
        got_t = yd.grad.full_tensor() if opts.get("target_grad") else None
        cols = slice(None)
    else:  # fsdp: each rank its own rows, the weight's rows sharded as fully_shard shards them
        Wd = distribute_tensor(W, mesh, [Shard(0)]).requires_grad_()
        out = lossfuse.linear_cross_entropy(xl, Wd, y, weight=None if w is None else w.to(dtype), chunk_size=4,
                                            **kw)
        assert type(out) is torch.Tensor
        out.backward(go.to(out.dtype))
        assert isinstance(Wd.grad, DTensor) and tuple(Wd.grad.placements) == (Shard(0),)
        got_x, got_W, got_b, got_t = xl.grad, Wd.grad.full_tensor(), None, None
        # The weight's gradient is averaged over the ranks, as FSDP2 reduces gradients.
        gW_ref = sum(single(r)[3] for r in range(world)) / world
        cols = slice(None)
    assert_close(out, ref, dtype, "loss", rtol=rtol)
    assert_close(got_x, gx_ref, dtype, "input gradient", rtol=rtol)
    assert_close(got_W, gW_ref[cols], dtype, "weight gradient", rtol=rtol)
    if got_b is not None:
        assert_close(got_b, gb_ref[cols], dtype, "bias gradient", rtol=rtol)
    if opts.get("target_grad"):
        assert_close(got_t, gt_ref[:, cols], dtype, "target gradient", rtol=rtol)
    return {}


def run_fsdp_training(mesh, rank, world, steps=10):
    """A tiny language model under FSDP2 (every block, the lm_head and the root ``fully_shard``-ed),
    its loss from lossfuse.linear_cross_entropy on the sharded lm_head weight (the model's forward
    returns the last hidden state): the loss curve of SGD steps equals the single-process run on the
    concatenated batches to 1e-5 relative, and so do the trained lm_head weights."""
    import copy

    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import lossfuse

    V, D, B, T = 37, 16, 3, 5  # B sequences of T tokens per rank

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, D)
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(2)])
            self.lm_head = nn.Linear(D, V, bias=False)

        def forward(self, ids):
            h = self.emb(ids)
            for block in self.blocks:
                h = h + block(h)
            return h

    torch.manual_seed(1234)  # the same initial weights on every rank and in the single-process model
    single = TinyLM()
    model = copy.deepcopy(single)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # SGD, not Adam: Adam is blind to the scale of a gradient, and the scale is what FSDP2 reduces.
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.5, momentum=0.9)
    gen = torch.Generator().manual_seed(99)
    curve, curve_single = [], []
    for _ in range(steps):
        ids = torch.randint(0, V, (world * B, T + 1), generator=gen)  # the global batch
        mine = ids[rank * B:(rank + 1) * B]
        h = model(mine[:, :-1])
        assert isinstance(model.lm_head.weight, DTensor), type(model.lm_head.weight)
        loss = lossfuse.linear_cross_entropy(h.reshape(-1, D), model.lm_head.weight, mine[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)  # every rank has as many tokens: the mean of the means
        curve.append(total.item() / world)

        hs = single(ids[:, :-1])
        loss_s = lossfuse.linear_cross_entropy(hs.reshape(-1, D), single.lm_head.weight, ids[:, 1:].reshape(-1))
        opt_single.zero_grad()
        loss_s.backward()
        opt_single.step()
        curve_single.append(loss_s.item())
    rel = max(abs(a - b) / abs(b) for a, b in zip(curve, curve_single))
    assert rel <= 1e-5, f"loss curves differ by {rel:.3g} relative:\n{curve}\n{curve_single}"
    assert curve_single[-1] < curve_single[0], curve_single  # it trained
    w = model.lm_head.weight.full_tensor().detach()
    w_rel = ((w - single.lm_head.weight.detach()).abs().max() / single.lm_head.weight.detach().abs().max()).item()
    assert w_rel <= 1e-5, f"trained lm_head weights differ by {w_rel:.3g} relative"
    return {"curve": curve, "curve_single": curve_single, "max_rel": rel, "weight_rel": w_rel}


# Inductor's code generation costs ~35 s on a 2-core CI machine, over this file's time budget: the
# default run captures the graphs with aot_eager (Dynamo + AOTAutograd, fullgraph, the functional
# collectives in the graph); LOSSFUSE_DIST_INDUCTOR=1 compiles the first case with inductor as well.
COMPILE_CASES = {
    "all-options": dict(backend="inductor" if os.environ.get("LOSSFUSE_DIST_INDUCTOR") == "1" else "aot_eager",
                        weight=True, eps=0.1, z_loss=1e-3, softcap=5.0),
    # The graph capture alone (Dynamo + AOTAutograd, no code generation: cheap) for the other paths.
    "aot_eager-prob-targets": dict(backend="aot_eager", prob=True, weight=True, eps=0.1, reduction="none"),
    "aot_eager-linear": dict(backend="aot_eager", linear=True, eps=0.1, softcap=5.0),
}


def run_compile(name, opts, rank, world):
    """torch.compile(fullgraph=True) of the vocab-parallel losses (functional collectives inside the
    graph): loss and gradients equal eager's."""
    from torch.distributed.tensor import Shard

    from helpers import assert_close
    from lossfuse.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(zlib.crc32(f"compile-{world}-{name}".encode()))
    sizes = [Shard.local_shard_size_and_offset(C, world, r)[0] for r in range(world)]
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    kw = dict(weight=(torch.rand(C, generator=gen) + 0.2)[start:stop] if opts.get("weight") else None,
              reduction=opts.get("reduction", "mean"), label_smoothing=opts.get("eps", 0.0),
              z_loss=opts.get("z_loss", 0.0), softcap=opts.get("softcap"), vocab_sizes=sizes)
    if opts.get("linear"):
        x = torch.randn(ROWS, H, generator=gen)
        W = torch.randn(C, H, generator=gen)[start:stop]
        y = torch.randint(0, C, (ROWS,), generator=gen)
        args = [x, W, y]

        def fn(x, W, y):
            return vocab_parallel_linear_cross_entropy(x, W, y, chunk_size=5, **kw)
    else:
        x = (torch.randn(ROWS, C, generator=gen) * 3)[:, start:stop]
        if opts.get("prob"):
            y = torch.softmax(torch.randn(ROWS, C, generator=gen), 1)[:, start:stop]
        else:
            y = torch.randint(0, C, (ROWS,), generator=gen)
            y[:3] = -100
        args = [x, y]

        def fn(x, y):
            return vocab_parallel_cross_entropy(x, y, **kw)
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend=opts["backend"])):
        leaves = [a.detach().clone().requires_grad_() if a.is_floating_point() else a for a in args]
        out = f(*leaves)
        out.backward(torch.ones_like(out) * 1.5)
        results.append((out, [a.grad for a in leaves if a.is_floating_point()]))
    (eager, eager_grads), (comp, comp_grads) = results
    assert_close(comp, eager.double(), torch.float32, "loss")
    for g_c, g_e in zip(comp_grads, eager_grads):
        assert_close(g_c, g_e.double(), torch.float32, "gradient")
    return {}
