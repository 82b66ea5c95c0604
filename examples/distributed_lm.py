"""A small language model's loss under torch.distributed, three ways (see README.md, "Distributed
training"); launch with torchrun, e.g.

    torchrun --nproc-per-node 2 examples/distributed_lm.py --setup dtensor    # loss_parallel-style logits
    torchrun --nproc-per-node 2 examples/distributed_lm.py --setup fsdp       # FSDP2, fused lm_head
    torchrun --nproc-per-node 2 examples/distributed_lm.py --setup explicit   # plain tensors, vocab-parallel

gloo on CPU tensors, NCCL on GPUs (one per rank). Each setup trains a few steps and prints the loss on
rank 0; the losses are the same in every setup's first step as single-process lossfuse (printed too).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import lossfuse
from lossfuse.distributed import vocab_parallel_cross_entropy

VOCAB, DIM, TOKENS = 1000, 64, 256


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.body = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.Linear(DIM, DIM))
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids):  # the last hidden state: the loss applies the lm_head
        return self.body(self.emb(ids))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--setup", choices=("dtensor", "fsdp", "explicit"), default="dtensor")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    torch.manual_seed(0)  # the same weights and batches on every rank
    model = TinyLM().to(device)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (TOKENS + 1,), generator=gen).to(device) for _ in range(args.steps)]

    if rank == 0:  # the single-process loss of the first batch, for comparison
        with torch.no_grad():
            h = model(batches[0][:-1])
            first = lossfuse.linear_cross_entropy(h, model.lm_head.weight, batches[0][1:])
            print(f"single-process first loss {first.item():.6f}")

    if args.setup == "dtensor":
        # A column-parallel lm_head (tensor parallel): its output, the logits, stays a DTensor sharded
        # on the vocabulary, as torch's loss_parallel() expects.
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        parallelize_module(model.lm_head, mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
    elif args.setup == "fsdp":
        # FSDP2: every rank trains on its own tokens; the lm_head weight is a sharded DTensor that
        # linear_cross_entropy takes as it is (the (tokens, vocab) logits never exist).
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, ids in enumerate(batches):
        x, y = ids[:-1], ids[1:]
        if args.setup == "dtensor":
            # lossfuse computes the loss of the class-sharded logits without gathering them.
            logits = model.lm_head(model(x))
            loss = lossfuse.cross_entropy(logits, distribute_tensor(y, mesh, [Replicate()]))
            loss.backward()
            loss = loss.full_tensor()
        elif args.setup == "fsdp":
            rows = slice(rank * TOKENS // world, (rank + 1) * TOKENS // world)  # this rank's tokens
            loss = lossfuse.linear_cross_entropy(model(x[rows]), model.lm_head.weight, y[rows])
            loss.backward()
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        else:
            # Explicit vocab-parallel on plain tensors: each rank computes its slice of the logits.
            sizes = [VOCAB // world + (r < VOCAB % world) for r in range(world)]
            start = sum(sizes[:rank])
            local_logits = model(x) @ model.lm_head.weight[start:start + sizes[rank]].t()
            loss = vocab_parallel_cross_entropy(local_logits, y, vocab_sizes=sizes)
            loss.backward()
            # Each rank's gradients hold its slice's contribution; their sum is the full gradient.
            for p_ in model.parameters():
                if p_.grad is not None:
                    dist.all_reduce(p_.grad)
        opt.step()
        opt.zero_grad()
        if rank == 0:
            print(f"{args.setup} step {step}: loss {loss.item():.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
