// Distillation CPU kernels (lossfuse/ops/distillation.py): the loss between the softmax of two sets of
// logits at a temperature, and its gradients, one row at a time. Compiled once per instruction set by
// isa_instantiate.h (no include guard; walk.h is pasted into the same namespace). DistillArgs is
// defined in distillation.cpp.
//
// Per row, with s = student / T, t = teacher / T, a = log_softmax(s), b = log_softmax(t),
// q = e^a, p = e^b and d = a - b:
//   forward KL (mode 0)  L = sum p (b - a) = -sum p d       dL/ds = q - p          dL/dt = p (-d - L)
//   reverse KL (mode 1)  L = sum q d                        dL/ds = q (d - L)      dL/dt = p - q
//   JSD (mode 2, 0 < beta < 1, liger-kernel's definition)   m = beta p + (1 - beta) q,
//     G = (1 - beta) q (a - log m), H = beta p (b - log m), L = sum G + sum H,
//     dL/ds = G - q sum G,  dL/dt = H - p sum H
// (gradients with respect to s and t; the caller folds 1 / T and the loss scale into the row's g).
//
// Three walks over a row: its statistics (max and sum of exps of both rows, read from memory once,
// the next block prefetched), then the sums the gradient needs, then the gradient -- the last two
// from cache (two rows of 32000 fp32 logits are 256 KB, L2-resident). Forward KL's student gradient
// needs no sum, so that common case writes it in the second walk.
//
// q - p is formed as e^max(a, b) * -expm1(-|d|) with the sign of d, d = ((s - t) - D_hi) - D_lo with
// D = lse_s - lse_t split into two floats: where q and p nearly agree, d is small and the difference
// keeps its relative precision instead of carrying the rounding of q and p (the GradScaler check,
// docs/design.md "Mixed precision", holds element by element).

#include "walk.h"

// Sums of exp(x * inv - m) over one block as (rest, top) (walk.h, add_exp_term).
template <class T, class A>
inline void scaled_block_sums(const T* x, int64_t n, A inv, A m, double* sum, double* top) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const V mv(m), iv(inv);
  V s0(A(0)), s1(A(0)), t0(A(0));
  int64_t c = 0;
  for (; c + 2 * W <= n; c += 2 * W) {
    __builtin_prefetch(x + c + kBlock, 0, 2);
    add_exp_term(V::load(x + c) * iv - mv, s0, t0);
    add_exp_term(V::load(x + c + W) * iv - mv, s1, t0);
  }
  for (; c < n; c += W) {
    const int k = n - c < W ? int(n - c) : W;
    add_exp_term(load_k(x + c, k, A(0)) * iv - mv, s0, t0, V::first(k));
  }
  *sum += double(hsum(s0 + s1));
  *top += double(hsum(count_value(t0)));
}

// Max and log-sum of a row of x * inv (inv > 0, so the max commutes with the scaling), online over
// blocks as row_stats_index (walk.h); a row whose first block is all -inf takes two plain passes.
template <class T, class A>
inline void scaled_row_stats(const T* x, int64_t C, A inv, A* m_out, double* logsum_out) {
  const A ninf = -std::numeric_limits<A>::infinity();
  A m = ninf;
  double sum = 0, top = 0;
  bool online = true;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t n = C - c0 < kBlock ? C - c0 : kBlock;
    const A bm = block_max<T, A>(x + c0, n) * inv;
    if (bm == ninf) {
      online = false;
      break;
    }
    if (bm > m) {
      if (m != ninf) {
        sum = (sum + top) * std::exp(double(m) - double(bm));
        top = 0;
      }
      m = bm;
    }
    scaled_block_sums<T, A>(x + c0, n, inv, m, &sum, &top);
  }
  if (!online) {
    m = block_max<T, A>(x, C) * inv;
    sum = top = 0;
    for (int64_t c0 = 0; c0 < C && m != ninf; c0 += kBlock) {
      const int64_t n = C - c0 < kBlock ? C - c0 : kBlock;
      scaled_block_sums<T, A>(x + c0, n, inv, m, &sum, &top);
    }
  }
  *m_out = m;
  *logsum_out = log_sum(sum, top);
}

// v = hi + lo, both in the accumulation type (hi alone when v is not finite).
template <class A>
inline void split_double(double v, A* hi, A* lo) {
  const A h = A(v);
  *hi = h;
  *lo = std::isfinite(double(h)) ? A(v - double(h)) : A(0);
}

// The per-row constants of the element formulas.
template <class A>
struct DistillRow {
  using V = Vec<A>;
  V inv, ms, ls, mt, lt, dhi, dlo;
  // a, b and d of one vector of student and teacher logits.
  void abd(V s, V t, V& a, V& b, V& d) const {
    a = (s * inv - ms) - ls;
    b = (t * inv - mt) - lt;
    d = ((s - t) * inv - dhi) - dlo;
  }
};

// q - p from d = a - b, without the cancellation of subtracting two rounded probabilities.
template <class V>
inline V q_minus_p(V a, V b, V d) {
  const V big = vexp(vmax(a, b));
  const V e = big * vexpm1(vneg(vabs(d)));  // -|q - p|
  return select(cmp_lt(d, V(0)), e, vneg(e));
}

// JSD's log-ratios a - log m and b - log m from u = a' - b', a' = a + log(1 - beta), b' = b + log(beta):
// log m = max(a', b') + log1p(e^-|u|), no cancellation anywhere.
template <class V>
inline void jsd_logs(V d, V lr, V nla, V nlb, V& am, V& bm) {
  const V u = d + lr;
  const V l1p = vlog1p(vexp(vneg(vabs(u))));
  am = (nla + vmin(u, V(0))) - l1p;
  bm = (nlb + vmin(vneg(u), V(0))) - l1p;
}

template <class T, class A>
int distill_rows(const DistillArgs& a) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const T* S = static_cast<const T*>(a.s);
  const T* TT = static_cast<const T*>(a.t);
  T* GS = static_cast<T*>(a.gs);
  T* GT = static_cast<T*>(a.gt);
  const A* G = static_cast<const A*>(a.g);
  A* loss_out = static_cast<A*>(a.loss);
  const int64_t C = a.V, R = a.R;
  const A inv = A(a.inv_t), beta = A(a.beta);
  const int mode = a.mode;
  // JSD's constants: log((1 - beta) / beta), -log(1 - beta), -log(beta), in the accumulation type.
  const V lr(mode == 2 ? A(std::log((1.0 - a.beta) / a.beta)) : A(0));
  const V nla(mode == 2 ? A(-std::log1p(-a.beta)) : A(0)), nlb(mode == 2 ? A(-std::log(a.beta)) : A(0));
  const V bv(beta), obv(A(1) - beta);
#pragma omp parallel for num_threads(a.nthreads) schedule(dynamic, a.chunk)
  for (int64_t r = 0; r < R; ++r) {
    const T* s = S + r * a.s_sR;
    const T* t = TT + r * a.t_sR;
    T* gs = GS ? GS + r * a.gs_sR : nullptr;
    T* gt = GT ? GT + r * a.gt_sR : nullptr;
    if (a.y && a.y[r * a.y_sR] == a.ignore_index) {
      loss_out[r] = A(0);
      if (gs) zero_row<T, A>(gs, C);
      if (gt) zero_row<T, A>(gt, C);
      continue;
    }
    A ms, mt;
    double lsd, ltd;
    scaled_row_stats<T, A>(s, C, inv, &ms, &lsd);
    scaled_row_stats<T, A>(t, C, inv, &mt, &ltd);
    const double D = (double(ms) + lsd) - (double(mt) + ltd);
    DistillRow<A> k;
    k.inv = V(inv);
    k.ms = V(ms);
    k.ls = V(A(lsd));
    k.mt = V(mt);
    k.lt = V(A(ltd));
    A dh, dl;
    split_double(D, &dh, &dl);
    k.dhi = V(dh);
    k.dlo = V(dl);
    const A g = G ? G[r * a.g_sR] : A(0);
    const V gv(g);
    // Walk 2: the row's sums; forward KL's student gradient on the way.
    const bool grad_in_sums = mode == 0 && gs;
    double L = 0, Ss = 0, St = 0;
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t c1 = c0 + kBlock < C ? c0 + kBlock : C;
      V l0(A(0)), l1(A(0));
      for (int64_t c = c0; c < c1; c += W) {
        const int kk = c1 - c < W ? int(c1 - c) : W;
        const auto on = V::first(kk);
        V av, bvv, dv;
        k.abd(load_k(s + c, kk, A(0)), load_k(t + c, kk, A(0)), av, bvv, dv);
        if (mode == 0) {
          l0 = l0 - select(on, vexp(bvv) * dv, V(A(0)));
          if (grad_in_sums) store_k(gv * q_minus_p(av, bvv, dv), gs + c, kk);
        } else if (mode == 1) {
          l0 = l0 + select(on, vexp(av) * dv, V(A(0)));
        } else {
          V am, bm;
          jsd_logs(dv, lr, nla, nlb, am, bm);
          l0 = l0 + select(on, obv * vexp(av) * am, V(A(0)));
          l1 = l1 + select(on, bv * vexp(bvv) * bm, V(A(0)));
        }
      }
      if (mode == 2) {
        Ss += double(hsum(l0));
        St += double(hsum(l1));
      } else {
        L += double(hsum(l0));
      }
    }
    if (mode == 2) L = Ss + St;
    loss_out[r] = A(L);
    const bool walk3 = (gs && !grad_in_sums) || gt;
    if (!walk3) continue;
    // Walk 3: the gradients that need the row's sums.
    const V Lv{A(L)}, Ssv{A(Ss)}, Stv{A(St)};
    for (int64_t c = 0; c < C; c += W) {
      const int kk = C - c < W ? int(C - c) : W;
      V av, bvv, dv;
      k.abd(load_k(s + c, kk, A(0)), load_k(t + c, kk, A(0)), av, bvv, dv);
      if (mode == 0) {  // teacher only: the student's was written in walk 2
        store_k(gv * (vexp(bvv) * (vneg(dv) - Lv)), gt + c, kk);
      } else if (mode == 1) {
        const V q = vexp(av);
        if (gs) store_k(gv * (q * (dv - Lv)), gs + c, kk);
        if (gt) store_k(gv * vneg(q_minus_p(av, bvv, dv)), gt + c, kk);
      } else {
        V am, bm;
        jsd_logs(dv, lr, nla, nlb, am, bm);
        if (gs) {
          const V q = vexp(av);
          store_k(gv * (q * (obv * am - Ssv)), gs + c, kk);
        }
        if (gt) {
          const V p = vexp(bvv);
          store_k(gv * (p * (bv * bm - Stv)), gt + c, kk);
        }
      }
    }
  }
  return 0;
}

inline int distill_run(const DistillArgs& a) {
  return with_dtype(a.dtype, [&](auto t, auto acc) { return distill_rows<decltype(t), decltype(acc)>(a); });
}
