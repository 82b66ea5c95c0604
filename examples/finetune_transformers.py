"""Train a tiny random Hugging Face causal LM with and without lossfuse under it (CPU: about a minute).

    python examples/finetune_transformers.py                    # Llama; transformers' loss, then both patches
    python examples/finetune_transformers.py --family gemma2    # soft-capped logits (fused into the kernel)
    python examples/finetune_transformers.py --bf16 --steps 20  # bfloat16 weights

The model is built from a config in code (random weights, nothing downloaded); the data is a synthetic
"language" over the first ``--alphabet`` token ids of the vocabulary, in which each next token is a
fixed function of the previous one, with 10% noise, so the loss falls within a few dozen steps (the
whole vocabulary is still scored: the logits stay (tokens, vocab)). The same initial weights and batches are trained three ways:

    transformers     the model as it is (its loss upcasts the logits to float32)
    lossfuse-logits  lossfuse.transformers.apply(model, fused_linear=False): lossfuse's cross-entropy on the logits
    lossfuse-fused   lossfuse.transformers.apply(model): the last hidden state goes through
                     lossfuse.linear_cross_entropy; the (tokens, vocab) logits never exist

Printed: the loss curves side by side, the median step time, and the peak memory of a training step
(forward + backward) above what existed before it (CPU: peak RSS; CUDA: max_memory_allocated).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; never reach for the hub

import torch

import lossfuse
import lossfuse.transformers

FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {"head_dim": 32}),
}


def build(family: str, vocab: int, hidden: int, layers: int, seq: int):
    import transformers

    cls_name, cfg_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=seq, **extra)
    return getattr(transformers, cls_name)(cfg)


def synthetic_batch(alphabet: int, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    tokens = torch.empty(batch, seq, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, alphabet, (batch,), generator=gen)
    for t in range(1, seq):
        rule = (tokens[:, t - 1] * 7 + 3) % alphabet
        noise = torch.rand(batch, generator=gen) < 0.1
        tokens[:, t] = torch.where(noise, torch.randint(0, alphabet, (batch,), generator=gen), rule)
    return tokens


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise OSError(field)


def peak_above_start(fn, device: torch.device) -> float:
    """Peak memory of ``fn()`` above what existed before it, in bytes (NaN where it cannot be read)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        # Give freed heap pages and lossfuse's cache of freed gradient buffers back first, so that every
        # page the step touches counts; then reset the kernel's high-water mark (Linux).
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc_trim(0)
        if lossfuse.cpu_kernels_available():
            lossfuse._backend._C.empty_cache()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_bytes("VmRSS")
        fn()
        return _status_bytes("VmHWM") - base
    except (OSError, AttributeError):
        fn()
        return float("nan")


def train(model, args, device, label: str):
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    losses, times, peaks = [], [], []
    for step in range(args.steps):
        tokens = synthetic_batch(args.alphabet, args.batch, args.seq, gen).to(device)
        out = {}

        def fwd_bwd():
            result = model(input_ids=tokens, labels=tokens)  # transformers shifts the labels itself
            result.loss.backward()
            out["loss"], out["logits"] = result.loss.detach(), result.logits

        start = time.perf_counter()
        if step == args.steps - 1:  # memory once, on a warm step (timed apart from the others)
            peaks.append(peak_above_start(fwd_bwd, device))
        else:
            fwd_bwd()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out["loss"].item())
    logits = "no logits" if out["logits"] is None else f"logits {tuple(out['logits'].shape)}"
    print(f"  {label:<16} median step {1e3 * statistics.median(times[1:] or times):7.1f} ms   "
          f"peak above start {peaks[0] / 2 ** 20:7.1f} MiB   ({logits})")
    return losses


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--alphabet", type=int, default=256, help="token ids the synthetic language uses")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bf16", action="store_true", help="bfloat16 weights (and logits)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if not 2 <= args.alphabet <= args.vocab:
        p.error("--alphabet must be between 2 and --vocab")
    device = torch.device(args.device)

    torch.manual_seed(0)
    base = build(args.family, args.vocab, args.hidden, args.layers, args.seq)
    base = base.to(device, torch.bfloat16 if args.bf16 else torch.float32)
    logits_mb = args.batch * args.seq * args.vocab * 4 / 2 ** 20
    print(f"{type(base).__name__}: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, "
          f"{args.batch}x{args.seq} tokens, vocab {args.vocab} (full float32 logits: {logits_mb:.0f} MiB), "
          f"{'bf16' if args.bf16 else 'fp32'}, {device}")

    curves = {}
    for label, fused in (("transformers", None), ("lossfuse-logits", False), ("lossfuse-fused", True)):
        model = copy.deepcopy(base)
        if fused is not None:
            lossfuse.transformers.apply(model, fused_linear=fused)
        curves[label] = train(model, args, device, label)

    names = list(curves)
    print("\nstep  " + "".join(f"{n:>17}" for n in names))
    for step in range(args.steps):
        if step % 5 == 0 or step == args.steps - 1:
            print(f"{step:4d}  " + "".join(f"{curves[n][step]:17.5f}" for n in names))
    ref = curves["transformers"]
    for n in names[1:]:
        worst = max(abs(a - b) / abs(b) for a, b in zip(curves[n], ref))
        print(f"{n}: largest relative difference from transformers' curve {worst:.1e}")


if __name__ == "__main__":
    main()
