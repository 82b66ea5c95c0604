"""Peak memory per rank of vocab-sharded linear + cross-entropy against single-process lossfuse.

    python bench/dist_memory.py                       # tokens 4096, hidden 512, vocab 32000, 2 ranks, fp32
    python bench/dist_memory.py --ranks 3 --vocab 48000 --dtype bfloat16

One forward + backward of ``lossfuse.linear_cross_entropy`` on the whole output layer in one process,
then of the vocab-sharded forms on every rank of a gloo world (CPU processes on loopback, started
here): ``lossfuse.distributed.vocab_parallel_linear_cross_entropy`` on each rank's slice of the
weight, and ``lossfuse.linear_cross_entropy`` on a ``Shard(0)`` DTensor weight (tensor parallel).
Each figure is the peak memory above what existed before the call (lossfuse/bench/measure.py,
``peak_bytes``: peak RSS on the CPU, the CUDA allocator's peak on a GPU; the inputs exist before, the
gradients and the chunk buffers are counted). A rank holds the whole input and its gradient (tokens x
hidden) and 1/P of the weight, its gradient and the chunk of logits, so the figure is a little above
1/P of the single-process one. Every result is checked against single-process lossfuse first.

Exit status 1 when a rank's figure exceeds 1/P + 5% of single-process lossfuse's (the project's
target, issue 14), or a result is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

TARGET_SLACK = 0.05


def _inputs(args, device):
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype)
    W = (torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden**0.5).to(device, dtype)
    y = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(device)
    return x, W, y


def _measure(fn, x, W, device):
    """Peak memory of the first forward + backward in this process: a repeated call would reuse pages
    the allocator kept from the first one, and the peak RSS would miss them."""
    from lossfuse.bench.measure import peak_bytes

    x.grad = W.grad = None
    kept = []

    def call():
        loss = fn()
        loss.backward()
        kept.append((loss.detach(), x.grad, W.grad))
        return kept[-1]

    peak = peak_bytes(call, device)
    loss, gx, gW = kept.pop()
    return {"peak": peak, "loss": float(loss)}, gx, gW


def single(args):
    import lossfuse

    device = torch.device(args.device)
    x, W, y = _inputs(args, device)
    x.requires_grad_(), W.requires_grad_()
    res, gx, gW = _measure(lambda: lossfuse.linear_cross_entropy(x, W, y), x, W, device)
    torch.save({"gx": gx, "gW": gW}, os.path.join(args.tmp, "single.pt"))
    return res


def rank_main(args, rank):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    import lossfuse
    from lossfuse.distributed import vocab_parallel_linear_cross_entropy

    device = torch.device(args.device)
    dist.init_process_group("gloo" if device.type == "cpu" else "nccl", init_method=f"file://{args.tmp}/init",
                            rank=rank, world_size=args.ranks)
    P = args.ranks
    sizes = [Shard.local_shard_size_and_offset(args.vocab, P, r)[0] for r in range(P)]
    start = sum(sizes[:rank])
    x, W, y = _inputs(args, device)
    ref = torch.load(os.path.join(args.tmp, "single.pt"))
    # The collectives' one-time setup (connections, small buffers) is not the loss's memory.
    dist.all_reduce(torch.zeros(8, device=device))
    dist.all_gather_into_tensor(torch.zeros(8 * P, device=device), torch.zeros(8, device=device))
    rows = slice(start, start + sizes[rank])
    if args._kind == "explicit":  # plain tensors, this rank's rows of the weight
        W_local = W[rows].clone().requires_grad_()
        del W
        x.requires_grad_()
        res, gx, gW = _measure(lambda: vocab_parallel_linear_cross_entropy(x, W_local, y, vocab_sizes=sizes),
                               x, W_local, device)
    else:  # a Replicate() input and a Shard(0) weight on a 1-D mesh (tensor parallel)
        mesh = init_device_mesh(device.type, (P,))
        xd = DTensor.from_local(x, mesh, [Replicate()], run_check=False).requires_grad_()
        Wd = DTensor.from_local(W[rows].clone(), mesh, [Shard(0)], run_check=False,
                                shape=torch.Size((args.vocab, args.hidden)), stride=(args.hidden, 1)).requires_grad_()
        del W, x
        res, gx, gW = _measure(lambda: lossfuse.linear_cross_entropy(xd, Wd, y), xd, Wd, device)
        gx, gW = gx.to_local(), gW.to_local()
    res["grads_ok"] = bool(torch.allclose(gx, ref["gx"], rtol=1e-4, atol=1e-6)
                           and torch.allclose(gW, ref["gW"][rows], rtol=1e-4, atol=1e-6))
    with open(os.path.join(args.tmp, f"{args._kind}{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_tmp", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_kind", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._rank is not None:
        args.tmp = args._tmp
        if args._rank < 0:
            print(json.dumps(single(args)))
        else:
            rank_main(args, args._rank)
        return 0

    from lossfuse.bench.measure import CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD, cpu_memory_supported

    if args.device == "cpu" and cpu_memory_supported() is not None:
        print(cpu_memory_supported())
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        base = [sys.executable, os.path.abspath(__file__)] + list(argv if argv is not None else sys.argv[1:])
        # The single-process figure in a process of its own: no rank's memory in its RSS.
        one = subprocess.run(base + ["--_rank", "-1", "--_tmp", tmp], check=True, capture_output=True, text=True)
        single_res = json.loads(one.stdout.strip().splitlines()[-1])
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        ranks = [{} for _ in range(args.ranks)]
        for kind in ("explicit", "dtensor"):  # a fresh world (fresh processes) for each
            if os.path.exists(os.path.join(tmp, "init")):
                os.remove(os.path.join(tmp, "init"))
            procs = [subprocess.Popen(base + ["--_rank", str(r), "--_tmp", tmp, "--_kind", kind], env=env)
                     for r in range(args.ranks)]
            if any(p.wait() != 0 for p in procs):
                print(f"a rank failed ({kind})")
                return 1
            for r in range(args.ranks):
                with open(os.path.join(tmp, f"{kind}{r}.json")) as f:
                    ranks[r][kind] = json.load(f)

    mib = 2**20
    limit = 1 / args.ranks + TARGET_SLACK
    logits = args.tokens * args.vocab * torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    print(f"linear + cross-entropy, tokens {args.tokens}, hidden {args.hidden}, vocab {args.vocab}, "
          f"{args.dtype}, {args.device}, {args.ranks} ranks, {args.threads} thread(s) per process")
    print(f"peak memory above the inputs ({CPU_MEMORY_METHOD if args.device == 'cpu' else CUDA_MEMORY_METHOD}); "
          f"the full logits would be {logits / mib:.1f} MiB")
    print(f"  single-process lossfuse.linear_cross_entropy: {single_res['peak'] / mib:8.1f} MiB   "
          f"loss {single_res['loss']:.6f}")
    ok = True
    for kind in ("explicit", "dtensor"):
        for r, res in enumerate(ranks):
            ratio = res[kind]["peak"] / single_res["peak"]
            close = abs(res[kind]["loss"] - single_res["loss"]) <= 1e-4 * abs(single_res["loss"])
            right = close and res[kind]["grads_ok"]
            verdict = ("ok" if ratio <= limit else f"OVER {limit:.3f}") + ("" if right else ", WRONG result")
            ok &= ratio <= limit and right
            print(f"  {kind:8s} rank {r}: {res[kind]['peak'] / mib:8.1f} MiB = {ratio:.3f} x single   "
                  f"loss {res[kind]['loss']:.6f}   [{verdict}]")
    print(f"target: each rank <= 1/{args.ranks} + {TARGET_SLACK:.0%} = {limit:.3f} x single-process")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
