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

// float16 / bfloat16 rows: the statistics in double. Their gradient must come within 1 ulp of the exact
// one x 2^16 (the GradScaler check, docs/design.md "Mixed precision"), and q - p = p expm1(d) is only
// as precise as d = (s - t) / T - (lse_s - lse_t): with fp32 exps, lse carries ~1e-7 of rounding, which
// is most of a small d (q and p within 1e-4 of each other happens a few times per thousand elements).
// Sums of double exps bring that to ~1e-15. float32 (whose gradient is float32: no such check) keeps
// the fp32 exps; float64 has double exps anyway.
#ifdef LF_VEC_AVX2
// e^y for y <= 0 in double lanes (clamped at -700, where e^y is ~1e-304: nothing next to the row max's
// e^0 = 1), relative error ~2e-16: a degree-11 Taylor polynomial on |r| <= ln2 / 2.
inline __m256d exp_neg_pd(__m256d y) {
  y = _mm256_max_pd(_mm256_set1_pd(-700.0), y);  // data second: NaN stays NaN
  const __m256d n = _mm256_round_pd(_mm256_mul_pd(y, _mm256_set1_pd(1.4426950408889634)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93147180369123816490e-01), y);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.90821492927058770002e-10), r);
  __m256d q = _mm256_set1_pd(1.0 / 39916800.0);
  const double inv_fact[] = {1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0,
                             1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};
  for (double c : inv_fact) q = _mm256_fmadd_pd(q, r, _mm256_set1_pd(c));
  const __m128i ni = _mm256_cvtpd_epi32(n);
  const __m256i bits = _mm256_slli_epi64(_mm256_add_epi64(_mm256_cvtepi32_epi64(ni), _mm256_set1_epi64x(1023)), 52);
  return _mm256_mul_pd(q, _mm256_castsi256_pd(bits));
}

// sum_c e^(x_c inv - m) over one block, in double.
// With `e`, the exps are also written there (rounded to float).
template <class T>
inline double precise_block_sum(const T* x, int64_t n, double inv, double m, float* e = nullptr) {
  const __m256d iv = _mm256_set1_pd(inv), mv = _mm256_set1_pd(m);
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    __builtin_prefetch(x + c + kBlock, 0, 2);
    const __m256 v = Vec<float>::load(x + c).v;
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    const __m256d el = exp_neg_pd(_mm256_fmsub_pd(lo, iv, mv)), eh = exp_neg_pd(_mm256_fmsub_pd(hi, iv, mv));
    s0 = _mm256_add_pd(s0, el);
    s1 = _mm256_add_pd(s1, eh);
    if (e) _mm256_storeu_ps(e + c, _mm256_set_m128(_mm256_cvtpd_ps(eh), _mm256_cvtpd_ps(el)));
  }
  alignas(32) double b[4];
  _mm256_store_pd(b, _mm256_add_pd(s0, s1));
  double sum = (b[0] + b[1]) + (b[2] + b[3]);
  for (; c < n; ++c) {
    const double v = std::exp(double(to_acc<float>(x[c])) * inv - m);
    if (e) e[c] = float(v);
    sum += v;
  }
  return sum;
}
#else
template <class T>
inline double precise_block_sum(const T* x, int64_t n, double inv, double m, float* e = nullptr) {
  double sum = 0;
  for (int64_t c = 0; c < n; ++c) {
    const double v = std::exp(double(to_acc<float>(x[c])) * inv - m);
    if (e) e[c] = float(v);
    sum += v;
  }
  return sum;
}
#endif

// Max (as the accumulation type's value, the one walk 2 subtracts) and log-sum of a row of x * inv,
// the sums in double, online over blocks.
template <class T, class A>
inline void precise_row_stats(const T* x, int64_t C, A inv, A* m_out, double* logsum_out) {
  const double ninf = -HUGE_VAL, inv_d = double(inv);
  double m = ninf, sum = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t n = C - c0 < kBlock ? C - c0 : kBlock;
    const double bm = double(block_max<T, A>(x + c0, n)) * inv_d;
    if (bm == ninf) continue;  // a block of only -inf adds nothing
    if (bm > m) {
      if (m != ninf) sum *= std::exp(m - bm);
      m = bm;
    }
    sum += precise_block_sum<T>(x + c0, n, inv_d, m);
  }
  // lse = m + log(sum) exactly as m_out + logsum_out: walk 2 forms a = (x inv - m) - log(sum).
  const A mr = A(m);
  *m_out = mr;
  *logsum_out = m == ninf ? ninf : std::log(sum) + (m - double(mr));
}

// Rows of up to kScratchMax classes keep the exps of both rows in a per-thread scratch (two rows of
// 32000 fp32 logits and their exps are 512 KB, in L2): the row's max is read from memory, the exps are
// taken once, and q, p in the later walks are products, not exps. Longer rows recompute the exps.
constexpr int64_t kScratchMax = 32768;

// e_c = exp(x_c inv - m) into e, m (*m_out) the row's scaled max; returns lse = m + log(sum_c e_c) in
// double.
template <class T, class A, bool kPrecise>
inline double scratch_row_stats(const T* x, int64_t C, A inv, A* e, double* m_out) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const A xmax = block_max<T, A>(x, C);
  const A m = xmax * inv;
  double sum = 0;
  if constexpr (kPrecise) {
    const double md = double(xmax) * double(inv);
    *m_out = md;
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t n = C - c0 < kBlock ? C - c0 : kBlock;
      sum += precise_block_sum<T>(x + c0, n, double(inv), md, e + c0);
    }
    return md + std::log(sum);
  } else {
    const V iv(inv), mv(m);
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t c1 = c0 + kBlock < C ? c0 + kBlock : C;
      V s0(A(0)), s1(A(0));
      int64_t c = c0;
      for (; c + 2 * W <= c1; c += 2 * W) {
        const V e0 = vexp(V::load(x + c) * iv - mv), e1 = vexp(V::load(x + c + W) * iv - mv);
        e0.store(e + c);
        e1.store(e + c + W);
        s0 = s0 + e0;
        s1 = s1 + e1;
      }
      for (; c < c1; c += W) {
        const int k = c1 - c < W ? int(c1 - c) : W;
        const V ev = select(V::first(k), vexp(load_k(x + c, k, A(0)) * iv - mv), V(A(0)));
        store_k(ev, e + c, k);
        s0 = s0 + ev;
      }
      sum += double(hsum(s0 + s1));
    }
    *m_out = double(m);
    return double(m) + std::log(sum);
  }
}

// q - p without the cancellation of subtracting two rounded probabilities: the larger of the two
// times expm1(-|d|) -- as precise, relatively, as d is.
template <class V>
inline V exact_q_minus_p(V q, V p, V d) {
  const auto pos = cmp_lt(V(0), d);
  const V e = select(pos, q, p) * vexpm1(vneg(vabs(d)));  // -|q - p|
  return select(pos, vneg(e), e);
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
  // float16 / bfloat16: statistics in double and q - p through expm1 (see precise_row_stats).
  constexpr bool kPrecise = std::is_same_v<T, half_t> || std::is_same_v<T, bf16_t>;
  constexpr bool kExactDiff = !std::is_same_v<T, float>;
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
  const V bv(beta), obv(A(1) - beta), iv(inv);
  const bool use_scratch = C <= kScratchMax;
#pragma omp parallel num_threads(a.nthreads)
  {
  std::unique_ptr<A[]> scratch(use_scratch ? new A[2 * (C + W)] : nullptr);
  A* es = scratch.get();
  A* et = use_scratch ? es + C + W : nullptr;
#pragma omp for schedule(dynamic, a.chunk)
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
    double lse_s, lse_t;
    V ms(A(0)), ls(A(0)), mt(A(0)), lt(A(0)), rs(A(0)), rt(A(0));  // the exp-walk's a = (s inv - ms) - ls, or the scratch's q = e_s rs
    if (use_scratch) {
      double m_s, m_t;
      lse_s = scratch_row_stats<T, A, kPrecise>(s, C, inv, es, &m_s);
      lse_t = scratch_row_stats<T, A, kPrecise>(t, C, inv, et, &m_t);
      rs = V(A(std::exp(m_s - lse_s)));
      rt = V(A(std::exp(m_t - lse_t)));
    } else {
      A m1, m2;
      double l1, l2;
      if constexpr (kPrecise) {
        precise_row_stats<T, A>(s, C, inv, &m1, &l1);
        precise_row_stats<T, A>(t, C, inv, &m2, &l2);
      } else {
        scaled_row_stats<T, A>(s, C, inv, &m1, &l1);
        scaled_row_stats<T, A>(t, C, inv, &m2, &l2);
      }
      lse_s = double(m1) + l1;
      lse_t = double(m2) + l2;
      ms = V(m1);
      ls = V(A(l1));
      mt = V(m2);
      lt = V(A(l2));
    }
    A dh, dl;
    split_double(lse_s - lse_t, &dh, &dl);
    const V dhi(dh), dlo(dl);
    // One vector's d = a - b (see the header comment), q and p.
    auto elems = [&](int64_t c, int kk, V& d, V& q, V& p) {
      const V sv = load_k(s + c, kk, A(0)), tv = load_k(t + c, kk, A(0));
      d = ((sv - tv) * iv - dhi) - dlo;
      if (use_scratch) {
        q = load_k(es + c, kk, A(0)) * rs;
        p = load_k(et + c, kk, A(0)) * rt;
      } else {
        q = vexp((sv * iv - ms) - ls);
        p = vexp((tv * iv - mt) - lt);
      }
    };
    auto q_minus_p = [&](V q, V p, V d) { return kExactDiff ? exact_q_minus_p(q, p, d) : q - p; };
    const A g = G ? G[r * a.g_sR] : A(0);
    const V gv(g);
    // Streaming stores for a gradient far larger than the caches, where every row starts aligned.
    const bool stream = a.stream && gs && reinterpret_cast<uintptr_t>(gs) % (W * sizeof(T)) == 0;
    // Walk 2: the row's sums; forward KL's student gradient on the way.
    const bool grad_in_sums = mode == 0 && gs;
    double L = 0, Ss = 0, St = 0;
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t c1 = c0 + kBlock < C ? c0 + kBlock : C;
      V l0(A(0)), l1(A(0));
      for (int64_t c = c0; c < c1; c += W) {
        const int kk = c1 - c < W ? int(c1 - c) : W;
        const auto on = V::first(kk);
        V dv, q, p;
        elems(c, kk, dv, q, p);
        if (mode == 0) {
          l0 = l0 - select(on, p * dv, V(A(0)));
          if (grad_in_sums) {
            const V o = gv * q_minus_p(q, p, dv);
            if (kk == W && stream)
              o.stream(gs + c);
            else
              store_k(o, gs + c, kk);
          }
        } else if (mode == 1) {
          l0 = l0 + select(on, q * dv, V(A(0)));
        } else {
          V am, bm;
          jsd_logs(dv, lr, nla, nlb, am, bm);
          l0 = l0 + select(on, obv * q * am, V(A(0)));
          l1 = l1 + select(on, bv * p * bm, V(A(0)));
        }
      }
      if (mode == 2) {
        Ss += double(hsum(l0));
        St += double(hsum(l1));
      } else {
        L += double(hsum(l0));
      }
    }
    if (stream) store_fence();
    if (mode == 2) L = Ss + St;
    loss_out[r] = A(L);
    const bool walk3 = (gs && !grad_in_sums) || gt;
    if (!walk3) continue;
    // Walk 3: the gradients that need the row's sums.
    const V Lv{A(L)}, Ssv{A(Ss)}, Stv{A(St)};
    for (int64_t c = 0; c < C; c += W) {
      const int kk = C - c < W ? int(C - c) : W;
      V dv, q, p;
      elems(c, kk, dv, q, p);
      if (mode == 0) {  // teacher only: the student's was written in walk 2
        store_k(gv * (p * (vneg(dv) - Lv)), gt + c, kk);
      } else if (mode == 1) {
        if (gs) store_k(gv * (q * (dv - Lv)), gs + c, kk);
        if (gt) store_k(gv * vneg(q_minus_p(q, p, dv)), gt + c, kk);
      } else {
        V am, bm;
        jsd_logs(dv, lr, nla, nlb, am, bm);
        if (gs) store_k(gv * (q * (obv * am - Ssv)), gs + c, kk);
        if (gt) store_k(gv * (p * (bv * bm - Stv)), gt + c, kk);
      }
    }
  }
  }
  return 0;
}

inline int distill_run(const DistillArgs& a) {
  return with_dtype(a.dtype, [&](auto t, auto acc) { return distill_rows<decltype(t), decltype(acc)>(a); });
}
