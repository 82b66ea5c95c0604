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
// Up to three walks over a row. Walk 1 reads both rows from memory once, a block at a time (its max,
// then its exps from L1), and keeps the exps and s - t in a per-thread scratch (Scratch, rows of up to
// kScratchMax classes; longer rows recompute the exps in each walk). Walk 2 forms the row's sums from
// the scratch -- forward KL's student gradient needs none, so that common case is written here -- and
// walk 3 the gradients that need those sums.
//
// For float16 / bfloat16 / float64, q - p is formed as max(q, p) * -expm1(-|d|) with the sign of d
// (float32 subtracts: its gradient stays float32, no ulp check applies), and d = ((s - t) - D_hi) - D_lo with
// D = lse_s - lse_t split into two floats: where q and p nearly agree, d is small and the difference
// keeps its relative precision instead of carrying the rounding of q and p. For float16 / bfloat16 the
// sums behind D are taken in double (precise_row_stats), and the other gradients' brackets -- d - L,
// -d - L, the JSD's -- are formed in double from double row sums (precise_brackets), so that the
// GradScaler check (docs/design.md, "Mixed precision") holds element by element for every gradient.

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

// Max and log-sum of a row of x * inv (inv > 0, so the max commutes with the scaling): walk.h's
// online_row_walk.
template <class T, class A>
inline void scaled_row_stats(const T* x, int64_t C, A inv, A* m_out, double* logsum_out) {
  double sum = 0, top = 0;
  *m_out = online_row_walk<A>(
      C, sum, top, [&](int64_t c0, int64_t n) { return block_max<T, A>(x + c0, n) * inv; },
      [&](int64_t c0, int64_t n, A m) { scaled_block_sums<T, A>(x + c0, n, inv, m, &sum, &top); }, [](double) {},
      [] {});
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
// e^0 = 1), relative error below 1e-11 -- a degree-9 Taylor polynomial on |r| <= ln2 / 2 -- which
// leaves D an error of ~1e-11: what a d of 1e-7 still needs (a smaller one is rarer than 1 in 10^6).
inline __m256d exp_neg_pd(__m256d y) {
  y = _mm256_max_pd(_mm256_set1_pd(-700.0), y);  // data second: NaN stays NaN
  const __m256d n = _mm256_round_pd(_mm256_mul_pd(y, _mm256_set1_pd(1.4426950408889634)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93147180369123816490e-01), y);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.90821492927058770002e-10), r);
  __m256d q = _mm256_set1_pd(1.0 / 362880.0);
  const double inv_fact[] = {1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5,
                             1.0, 1.0};
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
    const __m256 v = load8(x + c);
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
inline void precise_row_stats(const T* x, int64_t C, double inv_d, A* m_out, double* logsum_out) {
  const double ninf = -HUGE_VAL;
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

// The float16 / bfloat16 gradients that are a probability times a difference of per-element and
// per-row terms -- reverse KL's student q (d - L), forward KL's teacher p (-d - L), both of the JSD's --
// cancel where the two terms nearly agree, and float32 terms leave their rounding (~1e-7 of the terms)
// in the small difference: several ulps of it (docs/design.md, "Mixed precision"). Those brackets are
// formed in double from double row sums instead, so the one rounding is the float of the result:
//   reverse KL  d - L = (dst - M_q) / T   and forward KL  -d - L = (M_p - dst) / T,
//     dst = s - t, M_q = sum_c q_c dst_c, M_p = sum_c p_c dst_c (the lse terms of d cancel exactly);
//   JSD  (1 - beta) (a - log m) - Ss and beta (b - log m) - St, each term and sum in double.

#ifdef LF_VEC_AVX2
// log1p(z) for z in [0, 1] in double lanes, absolute error ~1e-16: w = 1 + z (rounded to 1e-16), halved
// once into [sqrt(1/2), sqrt(2)), then log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172, by its
// series in s^2 to the 21st power.
inline __m256d log1p_unit_pd(__m256d z) {
  const __m256d one = _mm256_set1_pd(1.0);
  const __m256d w = _mm256_add_pd(one, z);
  const __m256d big = _mm256_cmp_pd(w, _mm256_set1_pd(1.4142135623730951), _CMP_GT_OQ);
  const __m256d m = _mm256_blendv_pd(w, _mm256_mul_pd(w, _mm256_set1_pd(0.5)), big);
  const __m256d f = _mm256_sub_pd(m, one);
  const __m256d sv = _mm256_div_pd(f, _mm256_add_pd(_mm256_set1_pd(2.0), f));
  const __m256d s2 = _mm256_mul_pd(sv, sv);
  __m256d p = _mm256_set1_pd(1.0 / 21);
  for (int k = 19; k >= 1; k -= 2) p = _mm256_fmadd_pd(p, s2, _mm256_set1_pd(1.0 / k));
  return _mm256_add_pd(_mm256_mul_pd(_mm256_add_pd(sv, sv), p), _mm256_and_pd(big, _mm256_set1_pd(0.6931471805599453)));
}

// Four floats of a pointer (float storage only: the brackets read s - t from the scratch) as doubles.
inline __m256d load4_pd(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
#endif

// JSD's a - log m and b - log m in double from d = a - b (jsd_logs' formulas).
struct JsdConsts {
  double lr, nla, nlb, beta;
};
inline void jsd_logs_scalar(double d, const JsdConsts& j, double* am, double* bm) {
  const double u = d + j.lr;
  const double l1p = std::log1p(std::exp(-std::fabs(u)));
  *am = (j.nla + std::min(u, 0.0)) - l1p;
  *bm = (j.nlb + std::min(-u, 0.0)) - l1p;
}

// sum_c e^(x_c inv - lse) (s_c - t_c) in double, x the student (M_q) or the teacher (M_p).
template <class T>
inline double precise_mean_diff(const T* x, const T* s, const T* t, int64_t n, double inv, double lse) {
  double sum = 0;
  int64_t c = 0;
#ifdef LF_VEC_AVX2
  const __m256d iv = _mm256_set1_pd(inv), lv = _mm256_set1_pd(lse);
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  for (; c + 8 <= n; c += 8) {
    const __m256 xv = load8(x + c), dv = _mm256_sub_ps(load8(s + c), load8(t + c));  // exact: see below
    const __m256d xl = _mm256_cvtps_pd(_mm256_castps256_ps128(xv)), xh = _mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1));
    const __m256d dl = _mm256_cvtps_pd(_mm256_castps256_ps128(dv)), dh = _mm256_cvtps_pd(_mm256_extractf128_ps(dv, 1));
    a0 = _mm256_fmadd_pd(exp_neg_pd(_mm256_fmsub_pd(xl, iv, lv)), dl, a0);
    a1 = _mm256_fmadd_pd(exp_neg_pd(_mm256_fmsub_pd(xh, iv, lv)), dh, a1);
  }
  alignas(32) double b[4];
  _mm256_store_pd(b, _mm256_add_pd(a0, a1));
  sum = (b[0] + b[1]) + (b[2] + b[3]);
#endif
  // (s - t of two float16 / bfloat16 values is exact in float32 unless their exponents differ by more
  // than 13 / 16 binades.)
  for (; c < n; ++c)
    sum += std::exp(double(to_acc<float>(x[c])) * inv - lse) * double(to_acc<float>(s[c]) - to_acc<float>(t[c]));
  return sum;
}

// JSD's row sums Ss = (1 - beta) sum q (a - log m) and St = beta sum p (b - log m) in double.
template <class T>
inline void precise_jsd_sums(const T* s, const T* t, int64_t n, double inv, double lse_s, double lse_t,
                             const JsdConsts& j, double* Ss, double* St) {
  double ss = 0, st = 0;
  int64_t c = 0;
#ifdef LF_VEC_AVX2
  const __m256d iv = _mm256_set1_pd(inv), ls = _mm256_set1_pd(lse_s), lt = _mm256_set1_pd(lse_t);
  const __m256d lr = _mm256_set1_pd(j.lr), nla = _mm256_set1_pd(j.nla), nlb = _mm256_set1_pd(j.nlb);
  const __m256d zero = _mm256_setzero_pd(), sign = _mm256_set1_pd(-0.0);
  __m256d as = zero, at = zero;
  auto four = [&](__m256d sd, __m256d td) {
    const __m256d a = _mm256_fmsub_pd(sd, iv, ls), b = _mm256_fmsub_pd(td, iv, lt);
    const __m256d u = _mm256_add_pd(_mm256_sub_pd(a, b), lr);
    const __m256d l1p = log1p_unit_pd(exp_neg_pd(_mm256_or_pd(u, sign)));  // log1p(e^-|u|)
    const __m256d am = _mm256_sub_pd(_mm256_add_pd(nla, _mm256_min_pd(u, zero)), l1p);
    const __m256d bm = _mm256_sub_pd(_mm256_add_pd(nlb, _mm256_min_pd(_mm256_sub_pd(zero, u), zero)), l1p);
    as = _mm256_fmadd_pd(exp_neg_pd(a), am, as);
    at = _mm256_fmadd_pd(exp_neg_pd(b), bm, at);
  };
  for (; c + 8 <= n; c += 8) {
    const __m256 sv = load8(s + c), tv = load8(t + c);
    four(_mm256_cvtps_pd(_mm256_castps256_ps128(sv)), _mm256_cvtps_pd(_mm256_castps256_ps128(tv)));
    four(_mm256_cvtps_pd(_mm256_extractf128_ps(sv, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(tv, 1)));
  }
  alignas(32) double b1[4], b2[4];
  _mm256_store_pd(b1, as);
  _mm256_store_pd(b2, at);
  ss = (b1[0] + b1[1]) + (b1[2] + b1[3]);
  st = (b2[0] + b2[1]) + (b2[2] + b2[3]);
#endif
  for (; c < n; ++c) {
    const double a = double(to_acc<float>(s[c])) * inv - lse_s, b = double(to_acc<float>(t[c])) * inv - lse_t;
    double am, bm;
    jsd_logs_scalar(a - b, j, &am, &bm);
    ss += std::exp(a) * am;
    st += std::exp(b) * bm;
  }
  *Ss = (1.0 - j.beta) * ss;
  *St = j.beta * st;
}

// The brackets of k <= W lanes from dst = s - t (float, exact), in double, rounded once to float:
// reverse KL / forward KL's teacher: (dst - M) inv into za; JSD: (1 - beta) am - Ss into za and
// beta bm - St into zb, with d = dst inv - D.
template <class A>
inline void precise_brackets(const A* dst, int k, int mode, double inv, double D, double M, const JsdConsts& j,
                             double Ss, double St, A* za, A* zb) {
  int c = 0;
#ifdef LF_VEC_AVX2
  if constexpr (std::is_same_v<A, float>) {
    const __m256d iv = _mm256_set1_pd(inv), Dv = _mm256_set1_pd(D), Mv = _mm256_set1_pd(M);
    const __m256d lr = _mm256_set1_pd(j.lr), nla = _mm256_set1_pd(j.nla), nlb = _mm256_set1_pd(j.nlb);
    const __m256d zero = _mm256_setzero_pd(), sign = _mm256_set1_pd(-0.0);
    const __m256d oma = _mm256_set1_pd(1.0 - j.beta), bv = _mm256_set1_pd(j.beta);
    const __m256d Ssv = _mm256_set1_pd(Ss), Stv = _mm256_set1_pd(St);
    for (; c + 4 <= k; c += 4) {
      const __m256d dv = load4_pd(dst + c);
      if (mode != 2) {
        _mm_storeu_ps(za + c, _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_sub_pd(dv, Mv), iv)));
        continue;
      }
      const __m256d u = _mm256_add_pd(_mm256_fmsub_pd(dv, iv, Dv), lr);
      const __m256d l1p = log1p_unit_pd(exp_neg_pd(_mm256_or_pd(u, sign)));
      const __m256d am = _mm256_sub_pd(_mm256_add_pd(nla, _mm256_min_pd(u, zero)), l1p);
      const __m256d bm = _mm256_sub_pd(_mm256_add_pd(nlb, _mm256_min_pd(_mm256_sub_pd(zero, u), zero)), l1p);
      _mm_storeu_ps(za + c, _mm256_cvtpd_ps(_mm256_fmsub_pd(oma, am, Ssv)));
      _mm_storeu_ps(zb + c, _mm256_cvtpd_ps(_mm256_fmsub_pd(bv, bm, Stv)));
    }
  }
#endif
  for (; c < k; ++c) {
    const double dd = double(dst[c]);
    if (mode != 2) {
      za[c] = A((dd - M) * inv);
      continue;
    }
    double am, bm;
    jsd_logs_scalar(dd * inv - D, j, &am, &bm);
    za[c] = A((1.0 - j.beta) * am - Ss);
    zb[c] = A(j.beta * bm - St);
  }
}

// Rows of up to kScratchMax classes keep, per thread, the exps of both rows and s - t in a scratch
// (three rows of 32000 floats: L2 / L3): both rows are read from memory once, a block at a time (its
// max first, then its exps from L1), each exp is taken once, and q, p and d in the later walks are
// products and differences. Longer rows recompute the exps in every walk.
constexpr int64_t kScratchMax = 32768;

// One row's scratch: e_s = exp(s inv - m_s(b)), e_t likewise, with m(b) the running max when block b was
// read (online softmax: a block's exps are rescaled afterwards by the factors r, not rewritten), and
// dst = s - t.
template <class A>
struct Scratch {
  A *es, *et, *dst;
  double *ms, *mt;  // running maxima per block
};

// The exps of one block of both rows into the scratch; returns their sums. kExact: exps valid down to
// the subnormals (vexp) where the fast one (vexp_normal) flagged a lane below the normal range.
template <class T, class A, bool kExact>
inline void scratch_block(const T* s, const T* t, int64_t n, A inv, A ms, A mt, A* es, A* et, A* dst, double* sum_s,
                          double* sum_t, bool* oob_out) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const V iv(inv), msv(ms), mtv(mt);
  auto oob = mask_none(V());
  auto ex = [&](V y) {
    if constexpr (kExact)
      return vexp(y);
    else
      return vexp_normal(y, oob);
  };
  V s0(A(0)), t0(A(0));
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    __builtin_prefetch(s + c + kBlock, 0, 2);
    __builtin_prefetch(t + c + kBlock, 0, 2);
    const V sv = V::load(s + c), tv = V::load(t + c);
    const V e1 = ex(sv * iv - msv), e2 = ex(tv * iv - mtv);
    e1.store(es + c);
    e2.store(et + c);
    (sv - tv).store(dst + c);
    s0 = s0 + e1;
    t0 = t0 + e2;
  }
  if (c < n) {
    const int k = int(n - c);
    const auto on = V::first(k);
    const V sv = load_k(s + c, k, A(0)), tv = load_k(t + c, k, A(0));
    const V e1 = select(on, ex(sv * iv - msv), V(A(0))), e2 = select(on, ex(tv * iv - mtv), V(A(0)));
    store_k(e1, es + c, k);
    store_k(e2, et + c, k);
    store_k(sv - tv, dst + c, k);
    s0 = s0 + e1;
    t0 = t0 + e2;
  }
  *sum_s += double(hsum(s0));
  *sum_t += double(hsum(t0));
  if constexpr (!kExact) *oob_out = *oob_out || mask_any(oob);
}

// Walk 1 over both rows into the scratch: returns lse_s and lse_t (double). kPrecise (float16 / bfloat16):
// the exps in double (see precise_row_stats), stored rounded to float.
template <class T, class A, bool kPrecise, bool kExact = false>
inline bool scratch_stats(const T* s, const T* t, int64_t C, A inv, double inv_d, const Scratch<A>& sc, double* lse_s,
                          double* lse_t) {
  const double ninf = -HUGE_VAL;
  double ms = ninf, mt = ninf, sum_s = 0, sum_t = 0;
  bool oob = false;
  for (int64_t c0 = 0, b = 0; c0 < C; c0 += kBlock, ++b) {
    const int64_t n = C - c0 < kBlock ? C - c0 : kBlock;
    // The maxima as the kernel's type computes them (x inv in A): the exps subtract exactly these.
    double bs = double(block_max<T, A>(s + c0, n) * inv), bt = double(block_max<T, A>(t + c0, n) * inv);
    if constexpr (kPrecise) {
      bs = double(block_max<T, A>(s + c0, n)) * inv_d;
      bt = double(block_max<T, A>(t + c0, n)) * inv_d;
    }
    if (bs > ms) {
      if (ms != ninf) sum_s *= std::exp(ms - bs);
      ms = bs;
    }
    if (bt > mt) {
      if (mt != ninf) sum_t *= std::exp(mt - bt);
      mt = bt;
    }
    sc.ms[b] = ms;
    sc.mt[b] = mt;
    if constexpr (kPrecise) {
      // A row still all -inf so far gives exps of NaN here; its lse is -inf, as torch.logsumexp's.
      sum_s += precise_block_sum<T>(s + c0, n, inv_d, ms, sc.es + c0);
      sum_t += precise_block_sum<T>(t + c0, n, inv_d, mt, sc.et + c0);
      using V = Vec<A>;
      for (int64_t c = 0; c < n; c += V::W) {
        const int k = n - c < V::W ? int(n - c) : V::W;
        store_k(load_k(s + c0 + c, k, A(0)) - load_k(t + c0 + c, k, A(0)), sc.dst + c0 + c, k);
      }
    } else {
      scratch_block<T, A, kExact>(s + c0, t + c0, n, inv, A(ms), A(mt), sc.es + c0, sc.et + c0, sc.dst + c0, &sum_s,
                                  &sum_t, &oob);
    }
  }
  if (oob) return scratch_stats<T, A, kPrecise, true>(s, t, C, inv, inv_d, sc, lse_s, lse_t);
  *lse_s = ms + std::log(sum_s);
  *lse_t = mt + std::log(sum_t);
  return true;
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
  // float16 / bfloat16 take 1 / T in double wherever they work in double: a float 1 / 3 is another
  // temperature, 3e-8 off, which moves M and the JSD's sums by about that much -- all of a bracket
  // of 1e-4. Their float d = s inv - D is formed with inv = ivh + ivl for the same reason.
  const double inv_p = kPrecise ? a.inv_t : double(inv);
  const int mode = a.mode;
  // JSD's constants: log((1 - beta) / beta), -log(1 - beta), -log(beta), in the accumulation type.
  const V lr(mode == 2 ? A(std::log((1.0 - a.beta) / a.beta)) : A(0));
  const V nla(mode == 2 ? A(-std::log1p(-a.beta)) : A(0)), nlb(mode == 2 ? A(-std::log(a.beta)) : A(0));
  const V bv(beta), obv(A(1) - beta), iv(inv);
  const bool use_scratch = C <= kScratchMax;
  const int64_t nblocks = (C + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(a.nthreads)
  {
  std::unique_ptr<A[]> scratch(use_scratch ? new A[3 * (C + W)] : nullptr);
  std::unique_ptr<double[]> block_max_buf(use_scratch ? new double[4 * nblocks] : nullptr);
  Scratch<A> sc{};
  if (use_scratch) {
    sc.es = scratch.get();
    sc.et = sc.es + C + W;
    sc.dst = sc.et + C + W;
    sc.ms = block_max_buf.get();
    sc.mt = sc.ms + nblocks;
  }
  // Per block, the factor that turns the scratch's exps into q and p: e^(m(b) - lse).
  double* fs = use_scratch ? sc.mt + nblocks : nullptr;
  double* ft = use_scratch ? fs + nblocks : nullptr;
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
      scratch_stats<T, A, kPrecise>(s, t, C, inv, inv_p, sc, &lse_s, &lse_t);
      for (int64_t b = 0; b < nblocks; ++b) {
        fs[b] = std::exp(sc.ms[b] - lse_s);
        ft[b] = std::exp(sc.mt[b] - lse_t);
      }
    } else {
      A m1, m2;
      double l1, l2;
      if constexpr (kPrecise) {
        precise_row_stats<T, A>(s, C, inv_p, &m1, &l1);
        precise_row_stats<T, A>(t, C, inv_p, &m2, &l2);
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
    // float16 / bfloat16: the brackets that cancel come from double row sums (precise_brackets): reverse
    // KL's student and forward KL's teacher need M = sum q (s - t) or sum p (s - t); the JSD's sums are
    // taken in double for the loss too, so that it has one value with or without gradients.
    double Mb = 0, Ssd = 0, Std = 0;
    const JsdConsts jc{mode == 2 ? std::log((1.0 - a.beta) / a.beta) : 0.0, mode == 2 ? -std::log1p(-a.beta) : 0.0,
                       mode == 2 ? -std::log(a.beta) : 0.0, a.beta};
    const bool precise_grad = kPrecise && ((mode == 1 && gs) || (mode == 0 && gt) || (mode == 2 && (gs || gt)));
    if constexpr (kPrecise) {
      if (mode == 1 && gs) Mb = precise_mean_diff<T>(s, s, t, C, inv_p, lse_s);
      if (mode == 0 && gt) Mb = precise_mean_diff<T>(t, s, t, C, inv_p, lse_t);
      if (mode == 2) precise_jsd_sums<T>(s, t, C, inv_p, lse_s, lse_t, jc, &Ssd, &Std);
    }
    A dh, dl;
    split_double(lse_s - lse_t, &dh, &dl);
    const V dhi(dh), dlo(dl);
    // One vector's d = a - b (see the header comment), q and p; rs, rt: the block's factors.
    const V ivh{A(inv_p)}, ivl{A(inv_p - double(A(inv_p)))};
    auto d_of = [&](V dst) {  // (s - t) / T - D
      if constexpr (kPrecise)
        return (fmadd(dst, ivh, vneg(dhi)) + dst * ivl) - dlo;
      else
        return (dst * iv - dhi) - dlo;
    };
    auto elems = [&](int64_t c, int kk, V& d, V& q, V& p) {
      if (use_scratch) {
        d = d_of(load_k(sc.dst + c, kk, A(0)));
        q = load_k(sc.es + c, kk, A(0)) * rs;
        p = load_k(sc.et + c, kk, A(0)) * rt;
      } else {
        const V sv = load_k(s + c, kk, A(0)), tv = load_k(t + c, kk, A(0));
        d = d_of(sv - tv);
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
    auto block_factors = [&](int64_t b) {
      if (use_scratch) {
        rs = V(A(fs[b]));
        rt = V(A(ft[b]));
      }
    };
    for (int64_t c0 = 0, b = 0; c0 < (kPrecise && mode == 2 ? 0 : C); c0 += kBlock, ++b) {
      const int64_t c1 = c0 + kBlock < C ? c0 + kBlock : C;
      block_factors(b);
      V l0(A(0)), l1(A(0));
      for (int64_t c = c0; c < c1; c += W) {
        const int kk = c1 - c < W ? int(c1 - c) : W;
        const auto on = V::first(kk);
        V dv, q, p;
        elems(c, kk, dv, q, p);
        if (mode == 0) {
          l0 = kk == W ? fnmadd(p, dv, l0) : l0 - select(on, p * dv, V(A(0)));
          if (grad_in_sums) {
            const V o = gv * q_minus_p(q, p, dv);
            if (kk == W && stream)
              o.stream(gs + c);
            else
              store_k(o, gs + c, kk);
          }
        } else if (mode == 1) {
          l0 = kk == W ? fmadd(q, dv, l0) : l0 + select(on, q * dv, V(A(0)));
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
    if (kPrecise && mode == 2) {
      Ss = Ssd;
      St = Std;
    }
    if (mode == 2) L = Ss + St;
    loss_out[r] = A(L);
    const bool walk3 = (gs && !grad_in_sums) || gt;
    if (!walk3) continue;
    // Walk 3: the gradients that need the row's sums.
    const V Lv{A(L)}, Ssv{A(Ss)}, Stv{A(St)};
    const double D = lse_s - lse_t;
    alignas(64) A dst[W] = {}, za[W] = {}, zb[W] = {};
    for (int64_t c = 0; c < C; c += W) {
      const int kk = C - c < W ? int(C - c) : W;
      if (c % kBlock == 0) block_factors(c / kBlock);
      V dv, q, p;
      elems(c, kk, dv, q, p);
      if (precise_grad) {
        if (use_scratch)
          (load_k(sc.dst + c, kk, A(0))).store(dst);
        else
          (load_k(s + c, kk, A(0)) - load_k(t + c, kk, A(0))).store(dst);
        precise_brackets<A>(dst, W, mode, inv_p, D, Mb, jc, Ss, St, za, zb);
        if (mode == 0) {
          store_k(gv * vneg(p * V::load(za)), gt + c, kk);  // -d - L = -(s - t - M_p) / T
        } else if (mode == 1) {
          if (gs) store_k(gv * (q * V::load(za)), gs + c, kk);
          if (gt) store_k(gv * vneg(q_minus_p(q, p, dv)), gt + c, kk);
        } else {
          if (gs) store_k(gv * (q * V::load(za)), gs + c, kk);
          if (gt) store_k(gv * (p * V::load(zb)), gt + c, kk);
        }
        continue;
      }
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
