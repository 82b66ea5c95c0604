// Cross-entropy CPU kernels. Compiled once per instruction set by isa_instantiate.h (no include guard,
// no #include: see vec.h). CeArgs is defined in cross_entropy.cpp.
//
// Logits are (N, C, S) with arbitrary strides; row r = n * S + s. Two walk orders:
//   rows:  class stride 1 ((N, C), channels-last) -- vectorised along the classes of one row;
//   tiles: spatial stride 1 ((N, C, H, W))        -- vectorised across 2 x W neighbouring rows, so
//          the usual segmentation layout is read in place instead of through a transposed copy.
// Forward: log-sum-exp (plus what label smoothing or a probability target needs) in one pass over
// memory; backward recomputes p = exp(x - lse) rather than storing an N x C softmax.
// Every sum is in fp32 lanes (fp64 for double) folded into a double every kBlock elements, so a
// 256k-class row keeps the rounding error of a 4k-class one.
//
// Options: label smoothing eps, class weights w, z-loss z * lse^2 (PaLM), logit soft-capping
// x' = cap * tanh(x / cap) (Gemma; all formulas below then hold for x'), and an in-place backward
// that writes the gradient over the logits.
//
// The saved lse is a double: the backward forms x - lse as (x - hi) - lo with lse = hi + lo split into
// two floats. A single fp32 lse would carry half an ulp of |lse| (5e-4 at |lse| = 1e4) into every
// probability of the row.

constexpr int64_t kBlock = 4096;

template <class T, class A>
inline Vec<A> load_k(const T* p, int k, A fill) {
  return k == Vec<A>::W ? Vec<A>::load(p) : Vec<A>::load_partial(p, k, fill);
}
template <class T, class A>
inline void store_k(Vec<A> v, T* p, int k) {
  if (k == Vec<A>::W)
    v.store(p);
  else
    v.store_partial(p, k);
}

template <class F>
inline int with_bool(bool b, F&& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}

inline void flag_bad(int* bad) { __atomic_store_n(bad, 1, __ATOMIC_RELAXED); }

template <class A>
struct Consts {
  A eps, keep, eps_c, wsum, z;
  explicit Consts(const CeArgs& a)
      : eps(A(a.eps)),
        keep(A(1) - A(a.eps)),
        eps_c(a.C > 0 ? A(a.eps) / A(a.C) : A(0)),
        wsum(A(a.w_sum)),
        z(A(a.z_loss)) {}
};

// Logit soft-capping x -> cap * tanh(x / cap), and its derivative 1 - tanh^2, when CAP.
template <class A, bool CAP>
struct SoftCap {
  using V = Vec<A>;
  A cap, inv;
  explicit SoftCap(double c) : cap(A(c)), inv(CAP ? A(1) / A(c) : A(0)) {}
  V operator()(V x) const { return CAP ? V(cap) * vtanh(x * V(inv)) : x; }
  A operator()(A x) const { return CAP ? cap * stanh(x * inv) : x; }
  // x' and d x'/d x
  void with_slope(V x, V& xc, V& slope) const {
    if (CAP) {
      const V t = vtanh(x * V(inv));
      xc = V(cap) * t;
      slope = fnmadd(t, t, V(A(1)));
    } else {
      xc = x;
    }
  }
  A slope(A x) const {
    if (!CAP) return A(1);
    const A t = stanh(x * inv);
    return A(1) - t * t;
  }
};

// lse = hi + lo, both in the accumulation type.
template <class A>
inline void split_lse(double lse, A* hi, A* lo) {
  const A h = A(lse);
  *hi = h;
  *lo = std::isfinite(double(h)) ? A(lse - double(h)) : A(0);
}

// Runs `pass(exp_fn)` with the fast exp, and again with the exact one if some lane underflowed below
// the normal range -- rare (logits spread by more than 87), and then those outputs must hold the
// true subnormal or zero values.
template <class V, class Pass>
inline void with_exact_redo(Pass&& pass) {
  auto oob = mask_none(V());
  pass([&](V e) { return vexp_normal(e, oob); });
  if (mask_any(oob)) pass([](V e) { return vexp(e); });
}

// In place the logits are gone once written, so a pass cannot be redone: the exact exp is taken per
// vector instead, where a lane left the normal range.
template <class V>
inline V vexp_checked(V e) {
  auto oob = mask_none(V());
  const V p = vexp_normal(e, oob);
  return mask_any(oob) ? vexp(e) : p;
}

template <class V, class Pass>
inline void run_backward_pass(bool inplace, Pass&& pass) {
  if (inplace)
    pass([](V e) { return vexp_checked(e); });
  else
    with_exact_redo<V>(pass);
}

// ------------------------------------------------------------------------------------------------
// Row walk: one row at a time, vectorised along classes.
// ------------------------------------------------------------------------------------------------

template <class T, class A>
inline A block_max(const T* x, int64_t n) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const A ninf = -std::numeric_limits<A>::infinity();
  V m0(ninf), m1(ninf), m2(ninf), m3(ninf);
  int64_t c = 0;
  for (; c + 4 * W <= n; c += 4 * W) {
    m0 = vmax(m0, V::load(x + c));
    m1 = vmax(m1, V::load(x + c + W));
    m2 = vmax(m2, V::load(x + c + 2 * W));
    m3 = vmax(m3, V::load(x + c + 3 * W));
  }
  for (; c + W <= n; c += W) m0 = vmax(m0, V::load(x + c));
  A m = hmax(vmax(vmax(m0, m1), vmax(m2, m3)));
  for (; c < n; ++c) {
    const A v = to_acc<A>(x[c]);
    m = v > m ? v : m;
  }
  return m;
}

// Sums over one block relative to the (capped) max m: exp(x' - m) and, with SMOOTH, w_c (x'_c - m)
// and w_c.
template <class T, class A, bool HAS_W, bool SMOOTH, bool CAP>
inline void block_sums_index(const T* x, const A* w, int64_t n, A m, const SoftCap<A, CAP>& cap, double* sum,
                             double* d, double* ws) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const V mv(m);
  V s0(A(0)), s1(A(0)), s2(A(0)), s3(A(0)), d0(A(0)), d1(A(0)), w0(A(0));
  int64_t c = 0;
  for (; c + 4 * W <= n; c += 4 * W) {
    // Pull the next block towards L2 while this one is summed from L1: the memory reads and the exp
    // arithmetic then overlap instead of taking turns (x + kBlock past the row end is the next row).
    __builtin_prefetch(x + c + kBlock, 0, 2);
    __builtin_prefetch(reinterpret_cast<const char*>(x + c + kBlock) + 64, 0, 2);
    const V e0 = cap(V::load(x + c)) - mv, e1 = cap(V::load(x + c + W)) - mv;
    const V e2 = cap(V::load(x + c + 2 * W)) - mv, e3 = cap(V::load(x + c + 3 * W)) - mv;
    s0 = s0 + vexp_sum_term(e0);
    s1 = s1 + vexp_sum_term(e1);
    s2 = s2 + vexp_sum_term(e2);
    s3 = s3 + vexp_sum_term(e3);
    if (SMOOTH) {
      if (HAS_W) {
        const V wa = V::load(w + c), wb = V::load(w + c + W), wc = V::load(w + c + 2 * W), wd = V::load(w + c + 3 * W);
        d0 = fmadd(wa, e0, fmadd(wc, e2, d0));
        d1 = fmadd(wb, e1, fmadd(wd, e3, d1));
        w0 = w0 + ((wa + wb) + (wc + wd));
      } else {
        d0 = d0 + (e0 + e2);
        d1 = d1 + (e1 + e3);
      }
    }
  }
  // The rest in single vectors, the last one partial: short rows (C = 10 .. 100) would otherwise
  // spend most of their time in scalar exp calls.
  for (; c < n; c += W) {
    const int k = n - c < W ? int(n - c) : W;
    const typename V::Mask on = V::first(k);
    const V e = cap(load_k(x + c, k, A(0))) - mv;
    s0 = s0 + select(on, vexp_sum_term(e), V(A(0)));
    if (SMOOTH) {
      const V wv = HAS_W ? load_k(w + c, k, A(0)) : V(A(1));
      d0 = d0 + select(on, wv * e, V(A(0)));
      if (HAS_W) w0 = w0 + select(on, wv, V(A(0)));
    }
  }
  double sd = double(hsum((s0 + s1) + (s2 + s3))), dd = double(hsum(d0 + d1));
  double wd = HAS_W ? double(hsum(w0)) : double(n);
  *sum += sd;
  *d += dd;
  *ws += wd;
}

// log-sum-exp statistics of one row in a single pass over memory: each kBlock-class block is read
// from memory once for its max and again from L1 for its sums, which are rescaled whenever the
// running max grows (online softmax). Returns the (capped) max m, sum_c exp(x'_c - m) and, with
// SMOOTH, sum_c w_c (x'_c - m). A block that is all -inf (masked vocabulary) would make x - m
// undefined while m is still -inf, so such rows take the plain two passes. tanh is increasing, so the
// capped max is the cap of the raw max.
template <class T, class A, bool HAS_W, bool SMOOTH, bool CAP>
inline void row_stats_index(const T* x, const A* w, int64_t C, const SoftCap<A, CAP>& cap, A* m_out,
                            double* sum_out, double* d_out) {
  const A ninf = -std::numeric_limits<A>::infinity();
  A m = ninf;
  double sum = 0, d = 0, ws = 0;
  bool online = true;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t n = C - c0 < kBlock ? C - c0 : kBlock;
    const A bm = cap(block_max<T, A>(x + c0, n));
    if (bm == ninf) {
      online = false;
      break;
    }
    if (bm > m) {
      if (m != ninf) {
        sum *= std::exp(double(m) - double(bm));
        if (SMOOTH) d += (double(m) - double(bm)) * ws;
      }
      m = bm;
    }
    block_sums_index<T, A, HAS_W, SMOOTH, CAP>(x + c0, HAS_W ? w + c0 : w, n, m, cap, &sum, &d, &ws);
  }
  if (!online) {
    m = cap(block_max<T, A>(x, C));
    sum = d = ws = 0;
    // A row of only -inf has lse = -inf (as torch.logsumexp); its loss is NaN either way, as torch's.
    for (int64_t c0 = 0; c0 < C && m != ninf; c0 += kBlock) {
      const int64_t n = C - c0 < kBlock ? C - c0 : kBlock;
      block_sums_index<T, A, HAS_W, SMOOTH, CAP>(x + c0, HAS_W ? w + c0 : w, n, m, cap, &sum, &d, &ws);
    }
  }
  *m_out = m;
  *sum_out = sum;
  *d_out = d;
}

template <class T, class A, bool HAS_W, bool SMOOTH, bool CAP>
int ce_fwd_index_rows(const CeArgs& a) {
  const T* X = static_cast<const T*>(a.x);
  const A* w = static_cast<const A*>(a.w);
  A* loss_out = static_cast<A*>(a.loss);
  double* lse_out = a.lse;
  const int64_t C = a.C, S = a.S, R = a.N * a.S;
  const Consts<A> k(a);
  const SoftCap<A, CAP> cap(a.softcap);
  int bad = 0;
#pragma omp parallel for num_threads(a.nthreads) schedule(dynamic, a.chunk)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = r / S, s = r - n * S;
    const T* x = X + n * a.x_sN + s * a.x_sS;
    A m;
    double sum, dsum;
    row_stats_index<T, A, HAS_W, SMOOTH, CAP>(x, w, C, cap, &m, &sum, &dsum);
    const double logsum_d = std::log(sum);
    const double lse = double(m) + logsum_d;
    const A logsum = A(logsum_d);
    lse_out[r] = lse;
    const int64_t y = a.y[n * a.y_sN + s * a.y_sS];
    A loss = 0;
    if (y != a.ignore_index) {
      if (y < 0 || y >= C) {
        flag_bad(&bad);
      } else {
        const A wy = HAS_W ? w[y] : A(1);
        // (m - x_y) + log(sum) rather than lse - x_y: exact when the target holds the max logit.
        loss = k.keep * wy * ((m - cap(to_acc<A>(x[y]))) + logsum);
        // sum_c w_c (lse - x_c) = W (lse - m) - sum_c w_c (x_c - m): no cancellation of large logits.
        if (SMOOTH) loss += k.eps_c * (k.wsum * logsum - A(dsum));
        loss += A(double(k.z) * lse * lse);
      }
    }
    loss_out[r] = loss;
  }
  return bad;
}

template <class T, class A, bool HAS_W, bool SMOOTH, bool CAP>
int ce_bwd_index_rows(const CeArgs& a) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const T* X = static_cast<const T*>(a.x);
  T* GX = static_cast<T*>(a.gx);
  const A* w = static_cast<const A*>(a.w);
  const A* G = static_cast<const A*>(a.g);
  const int64_t C = a.C, S = a.S, R = a.N * a.S;
  const Consts<A> k(a);
  const SoftCap<A, CAP> cap(a.softcap);
  int bad = 0;
#pragma omp parallel for num_threads(a.nthreads) schedule(dynamic, a.chunk)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = r / S, s = r - n * S;
    const T* x = X + n * a.x_sN + s * a.x_sS;
    T* gx = GX + n * a.gx_sN + s * a.gx_sS;
    const int64_t y = a.y[n * a.y_sN + s * a.y_sS];
    if (y == a.ignore_index || y < 0 || y >= C) {
      if (y != a.ignore_index) flag_bad(&bad);
      const V z(A(0));
      int64_t c = 0;
      for (; c + W <= C; c += W) z.store(gx + c);
      for (; c < C; ++c) put(gx + c, A(0));
      continue;
    }
    const A g = G[n * a.g_sN + s * a.g_sS];
    A hi, lo;
    split_lse(a.lse_in[r], &hi, &lo);
    const A lse = A(a.lse_in[r]);
    const A wy = HAS_W ? w[y] : A(1);
    const A xy_raw = to_acc<A>(x[y]);  // before the loop: in place, the loop overwrites it
    // d loss / d x'_c = p_c * kp - kw * w_c, less g * keep * wy at the target (patched below);
    // z-loss adds 2 z lse p_c. With soft-capping, times d x'/d x = 1 - tanh^2.
    const A kp = g * (k.keep * wy + (SMOOTH ? k.eps_c * k.wsum : A(0)) + A(2) * k.z * lse);
    const A kw = g * k.eps_c;
    const V kpv(kp), kwv(kw), hv(hi), lv(lo);
    // For p_y near 1, p_y - 1 is formed as -sum_{c != y} p_c from the same p_c this loop writes: no
    // cancellation. (x_y - lse rounds to 0 once lse absorbs a tiny log-sum, and a confident, correct
    // prediction would get a zero gradient -- as it does in torch.)
    double rest = 0;
    auto scalar_step = [&](int64_t c) {
      const A xr = to_acc<A>(x[c]);
      const A p = sexp((cap(xr) - hi) - lo);
      if (c != y) rest += double(p);
      A o = SMOOTH ? p * kp - kw * (HAS_W ? w[c] : A(1)) : p * kp;
      if (CAP) o *= cap.slope(xr);
      put(gx + c, o);
    };
    run_backward_pass<V>(a.inplace, [&](auto&& vexp_fn) {
      rest = 0;
      int64_t c = 0;
      if (a.stream)  // peel to the alignment streaming stores need
        for (; c < C && (reinterpret_cast<uintptr_t>(gx + c) % (W * sizeof(T))) != 0; ++c) scalar_step(c);
      while (c + 2 * W <= C) {
        const int64_t end = c + kBlock < C ? c + kBlock : C;
        V r0(A(0)), r1(A(0));
        for (; c + 2 * W <= end; c += 2 * W) {
          V x0, x1, d0, d1;
          cap.with_slope(V::load(x + c), x0, d0);
          cap.with_slope(V::load(x + c + W), x1, d1);
          V p0 = vexp_fn((x0 - hv) - lv);
          V p1 = vexp_fn((x1 - hv) - lv);
          V o0 = p0 * kpv, o1 = p1 * kpv;
          if (SMOOTH) {
            o0 = HAS_W ? fnmadd(kwv, V::load(w + c), o0) : o0 - kwv;
            o1 = HAS_W ? fnmadd(kwv, V::load(w + c + W), o1) : o1 - kwv;
          }
          if (CAP) {
            o0 = o0 * d0;
            o1 = o1 * d1;
          }
          if (a.stream) {
            o0.stream(gx + c);
            o1.stream(gx + c + W);
          } else {
            o0.store(gx + c);
            o1.store(gx + c + W);
          }
          if (c <= y && y < c + 2 * W) {  // leave the target's own p out of the sum
            A b[2 * W];
            p0.store(b);
            p1.store(b + W);
            b[y - c] = A(0);
            p0 = V::load(b);
            p1 = V::load(b + W);
          }
          r0 = r0 + p0;
          r1 = r1 + p1;
        }
        rest += double(hsum(r0 + r1));
      }
      // The rest in single vectors, the last one partial (short rows: no scalar exp calls).
      V r0(A(0));
      for (; c < C; c += W) {
        const int k = C - c < W ? int(C - c) : W;
        V xc, d;
        cap.with_slope(load_k(x + c, k, A(0)), xc, d);
        V p = vexp_fn((xc - hv) - lv);
        V o = p * kpv;
        if (SMOOTH) o = HAS_W ? fnmadd(kwv, load_k(w + c, k, A(0)), o) : o - kwv;
        if (CAP) o = o * d;
        store_k(o, gx + c, k);
        if (c <= y && y < c + k) {
          A b[W];
          p.store(b);
          b[y - c] = A(0);
          p = V::load(b);
        }
        r0 = r0 + select(V::first(k), p, V(A(0)));
      }
      rest += double(hsum(r0));
    });
    // Streaming stores are weakly ordered: fence them before the target element is overwritten.
    if (a.stream) store_fence();
    // The target's own element, formed whole in fp32 and cast once. p_y - 1 two ways, each where it
    // is better conditioned: -sum_{c != y} p_c carries lse's rounding relative to (1 - p_y), expm1
    // relative to p_y.
    const A dy = (cap(xy_raw) - hi) - lo;
    const A py = sexp(dy);
    const A py_minus_1 = py > A(0.5) ? -A(rest) : sexpm1(dy);
    A gy = g * (k.keep * wy * py_minus_1 + A(2) * k.z * lse * py);
    if (SMOOTH) gy += kw * (py * k.wsum - wy);
    if (CAP) gy *= cap.slope(xy_raw);
    put(gx + y, gy);
  }
  return bad;
}

// Probability targets, t'_c = t_c (1 - eps) + eps / C:
//   loss = sum_c w_c t'_c (lse - x'_c) = log(sum) * sum_c w_c t'_c - sum_c w_c t'_c (x'_c - m).
template <class T, class TT, class A, bool HAS_W, bool CAP>
inline void block_sums_prob(const T* x, const TT* t, const A* w, int64_t n, A m, const Consts<A>& k,
                            const SoftCap<A, CAP>& cap, double* sum, double* tw, double* twd) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const V mv(m), keepv(k.keep), epscv(k.eps_c);
  V s0(A(0)), w0(A(0)), d0(A(0));
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const V e = cap(V::load(x + c)) - mv;
    s0 = s0 + vexp_sum_term(e);
    V wt = fmadd(V::load(t + c), keepv, epscv);
    if (HAS_W) wt = wt * V::load(w + c);
    w0 = w0 + wt;
    d0 = fmadd(wt, e, d0);
  }
  if (c < n) {  // the last, partial vector
    const int kk = int(n - c);
    const typename V::Mask on = V::first(kk);
    const V e = cap(load_k(x + c, kk, A(0))) - mv;
    s0 = s0 + select(on, vexp_sum_term(e), V(A(0)));
    V wt = fmadd(load_k(t + c, kk, A(0)), keepv, epscv);
    if (HAS_W) wt = wt * load_k(w + c, kk, A(0));
    wt = select(on, wt, V(A(0)));
    w0 = w0 + wt;
    d0 = fmadd(wt, select(on, e, V(A(0))), d0);
  }
  double sd = double(hsum(s0)), twd_ = double(hsum(d0)), tw_ = double(hsum(w0));
  *sum += sd;
  *tw += tw_;
  *twd += twd_;
}

template <class T, class TT, class A, bool HAS_W, bool CAP>
int ce_fwd_prob_rows(const CeArgs& a) {
  const T* X = static_cast<const T*>(a.x);
  const TT* TG = static_cast<const TT*>(a.t);
  const A* w = static_cast<const A*>(a.w);
  A* loss_out = static_cast<A*>(a.loss);
  const int64_t C = a.C, S = a.S, R = a.N * a.S;
  const Consts<A> k(a);
  const SoftCap<A, CAP> cap(a.softcap);
  const A ninf = -std::numeric_limits<A>::infinity();
#pragma omp parallel for num_threads(a.nthreads) schedule(dynamic, a.chunk)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = r / S, s = r - n * S;
    const T* x = X + n * a.x_sN + s * a.x_sS;
    const TT* t = TG + n * a.t_sN + s * a.t_sS;
    A m = ninf;
    double sum = 0, tw = 0, twd = 0;
    bool online = true;  // as row_stats_index
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t nb = C - c0 < kBlock ? C - c0 : kBlock;
      const A bm = cap(block_max<T, A>(x + c0, nb));
      if (bm == ninf) {
        online = false;
        break;
      }
      if (bm > m) {
        if (m != ninf) {
          sum *= std::exp(double(m) - double(bm));
          twd += (double(m) - double(bm)) * tw;
        }
        m = bm;
      }
      block_sums_prob<T, TT, A, HAS_W, CAP>(x + c0, t + c0, HAS_W ? w + c0 : w, nb, m, k, cap, &sum, &tw, &twd);
    }
    if (!online) {
      m = cap(block_max<T, A>(x, C));
      sum = tw = twd = 0;
      for (int64_t c0 = 0; c0 < C && m != ninf; c0 += kBlock) {
        const int64_t nb = C - c0 < kBlock ? C - c0 : kBlock;
        block_sums_prob<T, TT, A, HAS_W, CAP>(x + c0, t + c0, HAS_W ? w + c0 : w, nb, m, k, cap, &sum, &tw, &twd);
      }
    }
    const double logsum = std::log(sum);
    const double lse = double(m) + logsum;
    a.lse[r] = lse;
    loss_out[r] = A(logsum * tw - twd + double(k.z) * lse * lse);
  }
  return 0;
}

template <class T, class TT, class A, bool HAS_W, bool CAP>
int ce_bwd_prob_rows(const CeArgs& a) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const T* X = static_cast<const T*>(a.x);
  const TT* TG = static_cast<const TT*>(a.t);
  T* GX = static_cast<T*>(a.gx);
  TT* GT = static_cast<TT*>(a.gt);
  const A* w = static_cast<const A*>(a.w);
  const A* G = static_cast<const A*>(a.g);
  const int64_t C = a.C, S = a.S, R = a.N * a.S;
  const Consts<A> k(a);
  const SoftCap<A, CAP> cap(a.softcap);
#pragma omp parallel for num_threads(a.nthreads) schedule(dynamic, a.chunk)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = r / S, s = r - n * S;
    const T* x = X + n * a.x_sN + s * a.x_sS;
    const TT* t = TG + n * a.t_sN + s * a.t_sS;
    const A g = G[n * a.g_sN + s * a.g_sS];
    A hi, lo;
    split_lse(a.lse_in[r], &hi, &lo);
    const A lse = A(a.lse_in[r]);
    const V keepv(k.keep), epscv(k.eps_c), hv(hi), lv(lo), gv(g);
    // The target gradient first: in place, the input gradient overwrites the logits it reads.
    if (GT) {
      // d loss / d t_c = g (1 - eps) w_c (lse - x'_c)
      TT* gt = GT + n * a.gt_sN + s * a.gt_sS;
      const V gk(g * k.keep);
      int64_t c = 0;
      for (; c + W <= C; c += W) {
        V o = gk * ((hv - cap(V::load(x + c))) + lv);
        if (HAS_W) o = o * V::load(w + c);
        o.store(gt + c);
      }
      for (; c < C; ++c) put(gt + c, g * k.keep * (HAS_W ? w[c] : A(1)) * ((hi - cap(to_acc<A>(x[c]))) + lo));
    }
    if (GX) {
      // d loss / d x'_c = g (p_c (sum_k w_k t'_k + 2 z lse) - w_c t'_c): the target's weighted mass first.
      double tw = 0;
      int64_t c = 0;
      while (c + W <= C) {
        const int64_t end = c + kBlock < C ? c + kBlock : C;
        V w0(A(0));
        for (; c + W <= end; c += W) {
          const V wt = fmadd(V::load(t + c), keepv, epscv);
          w0 = w0 + (HAS_W ? wt * V::load(w + c) : wt);
        }
        tw += double(hsum(w0));
      }
      for (; c < C; ++c) tw += double((to_acc<A>(t[c]) * k.keep + k.eps_c) * (HAS_W ? w[c] : A(1)));
      T* gx = GX + n * a.gx_sN + s * a.gx_sS;
      const A gp = g * (A(tw) + A(2) * k.z * lse);
      const V gpv(gp);
      run_backward_pass<V>(a.inplace, [&](auto&& vexp_fn) {
        int64_t c = 0;
        for (; c + W <= C; c += W) {
          V wt = fmadd(V::load(t + c), keepv, epscv);
          if (HAS_W) wt = wt * V::load(w + c);
          V xc, slope;
          cap.with_slope(V::load(x + c), xc, slope);
          V o = fnmadd(gv, wt, vexp_fn((xc - hv) - lv) * gpv);
          if (CAP) o = o * slope;
          o.store(gx + c);
        }
        for (; c < C; ++c) {
          const A wt = (to_acc<A>(t[c]) * k.keep + k.eps_c) * (HAS_W ? w[c] : A(1));
          const A xr = to_acc<A>(x[c]);
          put(gx + c, (sexp((cap(xr) - hi) - lo) * gp - g * wt) * cap.slope(xr));
        }
      });
    }
  }
  return 0;
}

// ------------------------------------------------------------------------------------------------
// Tile walk: kU vectors of neighbouring rows (spatial positions) at once, one class at a time. Each
// lane is a row, so the per-row math (log, expm1, the loss) is vector math too. kU = 2 makes a tile
// one 64-byte line of fp32 per class.
// ------------------------------------------------------------------------------------------------

constexpr int kU = 2;

template <class A>
struct Tile {
  static constexpr int W = Vec<A>::W;
  static constexpr int L = kU * W;  // lanes
  int64_t n, s0;
  int k;  // live lanes
  int kv(int u) const {  // live lanes in vector u
    const int v = k - u * W;
    return v < 0 ? 0 : (v > W ? W : v);
  }
};

template <class A>
inline Tile<A> tile_at(int64_t tix, int64_t per_n, int64_t S) {
  Tile<A> t;
  t.n = tix / per_n;
  t.s0 = (tix - t.n * per_n) * Tile<A>::L;
  const int64_t left = S - t.s0;
  t.k = int(left < Tile<A>::L ? left : Tile<A>::L);
  return t;
}

// Adds the lanes of v into acc (fp32 block sums into double running sums).
template <class A>
inline void fold(Vec<A> v, double* acc) {
  A b[Vec<A>::W];
  v.store(b);
  for (int j = 0; j < Vec<A>::W; ++j) acc[j] += double(b[j]);
}
template <class A>
inline Vec<A> unfold(const double* acc) {
  A b[Vec<A>::W];
  for (int j = 0; j < Vec<A>::W; ++j) b[j] = A(acc[j]);
  return Vec<A>::load(b);
}

// lse of the tile's lanes, split as in split_lse.
template <class A>
inline void tile_lse(const double* lse, const Tile<A>& tl, int u, Vec<A>* hi, Vec<A>* lo, Vec<A>* full) {
  constexpr int W = Vec<A>::W;
  A h[W] = {}, l[W] = {}, f[W] = {};
  for (int j = 0; j < tl.kv(u); ++j) {
    split_lse(lse[j], h + j, l + j);
    f[j] = A(lse[j]);
  }
  *hi = Vec<A>::load(h);
  *lo = Vec<A>::load(l);
  *full = Vec<A>::load(f);
}

// A tile reads one short run from each of C class planes -- more concurrent streams than the hardware
// prefetchers follow -- so the first pass over a tile asks for the same runs kPrefetchTiles tiles on.
constexpr int kPrefetchTiles = 4;

template <class T, class A>
inline void prefetch_tile_ahead(const T* x, int64_t c, int64_t sC, bool write = false) {
  const char* p = reinterpret_cast<const char*>(x + c * sC + kPrefetchTiles * Tile<A>::L);
  if (write)
    __builtin_prefetch(p, 1, 2);
  else
    __builtin_prefetch(p, 0, 2);
  if (sizeof(T) * Tile<A>::L > 64) __builtin_prefetch(p + 64, write ? 1 : 0, 2);
}

template <class T, class A, bool CAP>
inline void tile_max(const T* x, int64_t C, int64_t sC, const Tile<A>& tl, const SoftCap<A, CAP>& cap,
                     Vec<A>* m) {
  using V = Vec<A>;
  for (int u = 0; u < kU; ++u) m[u] = V(-std::numeric_limits<A>::infinity());
  for (int64_t c = 0; c < C; ++c) {
    prefetch_tile_ahead<T, A>(x, c, sC);
    for (int u = 0; u < kU; ++u)
      if (tl.kv(u)) m[u] = vmax(m[u], load_k(x + c * sC + u * V::W, tl.kv(u), A(0)));
  }
  for (int u = 0; u < kU; ++u) m[u] = cap(m[u]);
}

// Per-lane class-index bookkeeping of a tile: target, its raw logit, its weight, whether the row counts.
template <class A>
struct TileTargets {
  static constexpr int L = Tile<A>::L;
  alignas(32) A xy[L] = {}, wy[L] = {};
  int64_t y[L] = {};
  bool live[L] = {};
};

template <class T, class A, bool HAS_W>
inline void tile_targets(const CeArgs& a, const Tile<A>& tl, const T* x, const A* w, TileTargets<A>& tt, int* bad) {
  for (int j = 0; j < tl.k; ++j) {
    const int64_t y = a.y[tl.n * a.y_sN + (tl.s0 + j) * a.y_sS];
    tt.y[j] = y;
    if (y == a.ignore_index) continue;
    if (y < 0 || y >= a.C) {
      flag_bad(bad);
      continue;
    }
    tt.live[j] = true;
    tt.xy[j] = to_acc<A>(x[y * a.x_sC + j]);
    tt.wy[j] = HAS_W ? w[y] : A(1);
  }
}

template <class T, class A, bool HAS_W, bool SMOOTH, bool CAP>
int ce_fwd_index_tiles(const CeArgs& a) {
  using V = Vec<A>;
  constexpr int W = V::W, L = Tile<A>::L;
  const T* X = static_cast<const T*>(a.x);
  const A* w = static_cast<const A*>(a.w);
  A* loss_out = static_cast<A*>(a.loss);
  const int64_t C = a.C, S = a.S, sC = a.x_sC;
  const int64_t per_n = (S + L - 1) / L, tiles = a.N * per_n;
  const Consts<A> k(a);
  const SoftCap<A, CAP> cap(a.softcap);
  int bad = 0;
#pragma omp parallel for num_threads(a.nthreads) schedule(dynamic, a.chunk)
  for (int64_t tix = 0; tix < tiles; ++tix) {
    const Tile<A> tl = tile_at<A>(tix, per_n, S);
    const T* x = X + tl.n * a.x_sN + tl.s0;
    V m[kU];
    tile_max<T, A, CAP>(x, C, sC, tl, cap, m);
    double sum[L] = {}, dsum[L] = {};
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t c1 = c0 + kBlock < C ? c0 + kBlock : C;
      V sv[kU], dv[kU];
      for (int u = 0; u < kU; ++u) sv[u] = dv[u] = V(A(0));
      for (int64_t c = c0; c < c1; ++c) {
        for (int u = 0; u < kU; ++u) {
          if (!tl.kv(u)) continue;
          const V e = cap(load_k(x + c * sC + u * W, tl.kv(u), A(0))) - m[u];
          sv[u] = sv[u] + vexp_sum_term(e);
          if (SMOOTH) dv[u] = HAS_W ? fmadd(V(w[c]), e, dv[u]) : dv[u] + e;
        }
      }
      for (int u = 0; u < kU; ++u) {
        fold(sv[u], sum + u * W);
        if (SMOOTH) fold(dv[u], dsum + u * W);
      }
    }
    TileTargets<A> tt;
    tile_targets<T, A, HAS_W>(a, tl, x, w, tt, &bad);
    for (int u = 0; u < kU; ++u) {
      const int kv = tl.kv(u);
      if (!kv) continue;
      const V logsum = vlog(unfold<A>(sum + u * W));
      const int64_t r0 = tl.n * S + tl.s0 + u * W;
      A mb[W], lb[W];
      m[u].store(mb);
      logsum.store(lb);
      for (int j = 0; j < kv; ++j)
        a.lse[r0 + j] = mb[j] == -std::numeric_limits<A>::infinity() ? -HUGE_VAL : double(mb[j]) + double(lb[j]);
      V loss = V(k.keep) * V::load(tt.wy + u * W) * ((m[u] - cap(V::load(tt.xy + u * W))) + logsum);
      if (SMOOTH) loss = loss + V(k.eps_c) * (V(k.wsum) * logsum - unfold<A>(dsum + u * W));
      const V lse = m[u] + logsum;
      loss = fmadd(V(k.z) * lse, lse, loss);
      store_k(select(V::mask(tt.live + u * W), loss, V(A(0))), loss_out + r0, kv);
    }
  }
  return bad;
}

template <class T, class A, bool HAS_W, bool SMOOTH, bool CAP>
int ce_bwd_index_tiles(const CeArgs& a) {
  using V = Vec<A>;
  constexpr int W = V::W, L = Tile<A>::L;
  const T* X = static_cast<const T*>(a.x);
  T* GX = static_cast<T*>(a.gx);
  const A* w = static_cast<const A*>(a.w);
  const A* G = static_cast<const A*>(a.g);
  const int64_t C = a.C, S = a.S, sC = a.x_sC, gsC = a.gx_sC;
  const int64_t per_n = (S + L - 1) / L, tiles = a.N * per_n;
  const Consts<A> k(a);
  const SoftCap<A, CAP> cap(a.softcap);
  int bad = 0;
#pragma omp parallel for num_threads(a.nthreads) schedule(dynamic, a.chunk)
  for (int64_t tix = 0; tix < tiles; ++tix) {
    const Tile<A> tl = tile_at<A>(tix, per_n, S);
    const T* x = X + tl.n * a.x_sN + tl.s0;
    T* gx = GX + tl.n * a.gx_sN + tl.s0;
    TileTargets<A> tt;  // reads the target logits before anything is written (in place)
    tile_targets<T, A, HAS_W>(a, tl, x, w, tt, &bad);
    alignas(32) A g[L] = {}, gy[L] = {};
    for (int j = 0; j < tl.k; ++j)
      if (tt.live[j]) g[j] = G[tl.n * a.g_sN + (tl.s0 + j) * a.g_sS];
    V kpv[kU], kwv[kU], hv[kU], lv[kU], lsev[kU], yv[kU];
    typename V::Mask on[kU];
    alignas(32) A yf[L];
    for (int j = 0; j < L; ++j) yf[j] = tt.live[j] ? A(tt.y[j]) : A(-1);  // exact below 2^24 classes
    for (int u = 0; u < kU; ++u) {
      kpv[u] = kwv[u] = hv[u] = lv[u] = lsev[u] = V(A(0));
      on[u] = mask_none(V());
      yv[u] = V::load(yf + u * W);
      const int kv = tl.kv(u);
      if (!kv) continue;
      const V gv = V::load(g + u * W), wyv = V::load(tt.wy + u * W);
      tile_lse(a.lse_in + tl.n * S + tl.s0 + u * W, tl, u, hv + u, lv + u, lsev + u);
      kpv[u] = gv * (V(k.keep) * wyv + V(SMOOTH ? k.eps_c * k.wsum : A(0)) + V(A(2) * k.z) * lsev[u]);
      kwv[u] = gv * V(k.eps_c);
      on[u] = V::mask(tt.live + u * W);
    }
    // Per lane, sum_{c != y} p_c for the target element (see ce_bwd_index_rows).
    double rest[L] = {};
    run_backward_pass<V>(a.inplace, [&](auto&& vexp_fn) {
      for (int j = 0; j < L; ++j) rest[j] = 0;
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t c1 = c0 + kBlock < C ? c0 + kBlock : C;
        V r[kU];
        for (int u = 0; u < kU; ++u) r[u] = V(A(0));
        for (int64_t c = c0; c < c1; ++c) {
          prefetch_tile_ahead<T, A>(x, c, sC);
          prefetch_tile_ahead<T, A>(gx, c, gsC, true);
          const V cv{A(c)};
          for (int u = 0; u < kU; ++u) {
            const int kv = tl.kv(u);
            if (!kv) continue;
            V xc, slope;
            cap.with_slope(load_k(x + c * sC + u * W, kv, A(0)), xc, slope);
            const V p = vexp_fn((xc - hv[u]) - lv[u]);
            V o = p * kpv[u];
            if (SMOOTH) o = HAS_W ? fnmadd(kwv[u], V(w[c]), o) : o - kwv[u];
            if (CAP) o = o * slope;
            // Ignored rows get exact zeros, whatever their logits hold.
            store_k(select(on[u], o, V(A(0))), gx + c * gsC + u * W, kv);
            r[u] = r[u] + select(cmp_eq(yv[u], cv), V(A(0)), p);
          }
        }
        for (int u = 0; u < kU; ++u) fold(r[u], rest + u * W);
      }
    });
    for (int u = 0; u < kU; ++u) {
      if (!tl.kv(u)) continue;
      const V gv = V::load(g + u * W), wyv = V::load(tt.wy + u * W);
      V xyc, slope;
      cap.with_slope(V::load(tt.xy + u * W), xyc, slope);
      const V dy = (xyc - hv[u]) - lv[u];
      const V py = vexp(dy);
      const V py_minus_1 = select(cmp_lt(V(A(0.5)), py), vneg(unfold<A>(rest + u * W)), vexpm1(dy));
      V gyv = gv * (V(k.keep) * wyv * py_minus_1 + V(A(2) * k.z) * lsev[u] * py);
      if (SMOOTH) gyv = gyv + kwv[u] * (py * V(k.wsum) - wyv);
      if (CAP) gyv = gyv * slope;
      gyv.store(gy + u * W);
    }
    for (int j = 0; j < tl.k; ++j)
      if (tt.live[j]) put(gx + tt.y[j] * gsC + j, gy[j]);
  }
  return bad;
}

template <class T, class TT, class A, bool HAS_W, bool CAP>
int ce_fwd_prob_tiles(const CeArgs& a) {
  using V = Vec<A>;
  constexpr int W = V::W, L = Tile<A>::L;
  const T* X = static_cast<const T*>(a.x);
  const TT* TG = static_cast<const TT*>(a.t);
  const A* w = static_cast<const A*>(a.w);
  A* loss_out = static_cast<A*>(a.loss);
  const int64_t C = a.C, S = a.S, sC = a.x_sC, tsC = a.t_sC;
  const int64_t per_n = (S + L - 1) / L, tiles = a.N * per_n;
  const Consts<A> k(a);
  const SoftCap<A, CAP> cap(a.softcap);
#pragma omp parallel for num_threads(a.nthreads) schedule(dynamic, a.chunk)
  for (int64_t tix = 0; tix < tiles; ++tix) {
    const Tile<A> tl = tile_at<A>(tix, per_n, S);
    const T* x = X + tl.n * a.x_sN + tl.s0;
    const TT* t = TG + tl.n * a.t_sN + tl.s0;
    V m[kU];
    tile_max<T, A, CAP>(x, C, sC, tl, cap, m);
    double sum[L] = {}, tw[L] = {}, twd[L] = {};
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t c1 = c0 + kBlock < C ? c0 + kBlock : C;
      V sv[kU], wv[kU], dv[kU];
      for (int u = 0; u < kU; ++u) sv[u] = wv[u] = dv[u] = V(A(0));
      for (int64_t c = c0; c < c1; ++c) {
        for (int u = 0; u < kU; ++u) {
          const int kv = tl.kv(u);
          if (!kv) continue;
          const V e = cap(load_k(x + c * sC + u * W, kv, A(0))) - m[u];
          sv[u] = sv[u] + vexp_sum_term(e);
          V wt = fmadd(load_k(t + c * tsC + u * W, kv, A(0)), V(k.keep), V(k.eps_c));
          if (HAS_W) wt = wt * V(w[c]);
          wv[u] = wv[u] + wt;
          dv[u] = fmadd(wt, e, dv[u]);
        }
      }
      for (int u = 0; u < kU; ++u) {
        fold(sv[u], sum + u * W);
        fold(wv[u], tw + u * W);
        fold(dv[u], twd + u * W);
      }
    }
    for (int u = 0; u < kU; ++u) {
      const int kv = tl.kv(u);
      if (!kv) continue;
      const int64_t r0 = tl.n * S + tl.s0 + u * W;
      A mb[W], lb[W];
      m[u].store(mb);
      vlog(unfold<A>(sum + u * W)).store(lb);
      for (int j = 0; j < kv; ++j) {
        const int l = u * W + j;
        const double logsum = double(lb[j]);
        const double lse = mb[j] == -std::numeric_limits<A>::infinity() ? -HUGE_VAL : double(mb[j]) + logsum;
        a.lse[r0 + j] = lse;
        loss_out[r0 + j] = A(logsum * tw[l] - twd[l] + double(k.z) * lse * lse);
      }
    }
  }
  return 0;
}

template <class T, class TT, class A, bool HAS_W, bool CAP>
int ce_bwd_prob_tiles(const CeArgs& a) {
  using V = Vec<A>;
  constexpr int W = V::W, L = Tile<A>::L;
  const T* X = static_cast<const T*>(a.x);
  const TT* TG = static_cast<const TT*>(a.t);
  T* GX = static_cast<T*>(a.gx);
  TT* GT = static_cast<TT*>(a.gt);
  const A* w = static_cast<const A*>(a.w);
  const A* G = static_cast<const A*>(a.g);
  const int64_t C = a.C, S = a.S, sC = a.x_sC, tsC = a.t_sC;
  const int64_t per_n = (S + L - 1) / L, tiles = a.N * per_n;
  const Consts<A> k(a);
  const SoftCap<A, CAP> cap(a.softcap);
#pragma omp parallel for num_threads(a.nthreads) schedule(dynamic, a.chunk)
  for (int64_t tix = 0; tix < tiles; ++tix) {
    const Tile<A> tl = tile_at<A>(tix, per_n, S);
    const T* x = X + tl.n * a.x_sN + tl.s0;
    const TT* t = TG + tl.n * a.t_sN + tl.s0;
    alignas(32) A g[L] = {};
    for (int j = 0; j < tl.k; ++j) g[j] = G[tl.n * a.g_sN + (tl.s0 + j) * a.g_sS];
    V gv[kU], hv[kU], lv[kU], lsev[kU];
    for (int u = 0; u < kU; ++u) {
      gv[u] = V::load(g + u * W);
      hv[u] = lv[u] = lsev[u] = V(A(0));
      if (tl.kv(u)) tile_lse(a.lse_in + tl.n * S + tl.s0 + u * W, tl, u, hv + u, lv + u, lsev + u);
    }
    if (GT) {  // first: in place, the input gradient overwrites the logits
      TT* gt = GT + tl.n * a.gt_sN + tl.s0;
      for (int64_t c = 0; c < C; ++c)
        for (int u = 0; u < kU; ++u) {
          const int kv = tl.kv(u);
          if (!kv) continue;
          V o = gv[u] * V(k.keep) * ((hv[u] - cap(load_k(x + c * sC + u * W, kv, A(0)))) + lv[u]);
          if (HAS_W) o = o * V(w[c]);
          store_k(o, gt + c * a.gt_sC + u * W, kv);
        }
    }
    if (GX) {
      double tw[L] = {};
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t c1 = c0 + kBlock < C ? c0 + kBlock : C;
        V wv[kU];
        for (int u = 0; u < kU; ++u) wv[u] = V(A(0));
        for (int64_t c = c0; c < c1; ++c)
          for (int u = 0; u < kU; ++u) {
            const int kv = tl.kv(u);
            if (!kv) continue;
            const V wt = fmadd(load_k(t + c * tsC + u * W, kv, A(0)), V(k.keep), V(k.eps_c));
            wv[u] = wv[u] + (HAS_W ? wt * V(w[c]) : wt);
          }
        for (int u = 0; u < kU; ++u) fold(wv[u], tw + u * W);
      }
      V gp[kU];
      for (int u = 0; u < kU; ++u) gp[u] = gv[u] * (unfold<A>(tw + u * W) + V(A(2) * k.z) * lsev[u]);
      T* gx = GX + tl.n * a.gx_sN + tl.s0;
      run_backward_pass<V>(a.inplace, [&](auto&& vexp_fn) {
        for (int64_t c = 0; c < C; ++c)
          for (int u = 0; u < kU; ++u) {
            const int kv = tl.kv(u);
            if (!kv) continue;
            V wt = fmadd(load_k(t + c * tsC + u * W, kv, A(0)), V(k.keep), V(k.eps_c));
            if (HAS_W) wt = wt * V(w[c]);
            V xc, slope;
            cap.with_slope(load_k(x + c * sC + u * W, kv, A(0)), xc, slope);
            V o = fnmadd(gv[u], wt, vexp_fn((xc - hv[u]) - lv[u]) * gp[u]);
            if (CAP) o = o * slope;
            store_k(o, gx + c * a.gx_sC + u * W, kv);
          }
      });
    }
  }
  return 0;
}

// ------------------------------------------------------------------------------------------------
// Entry points: pick the walk order from the strides and the template flags from the options.
// ------------------------------------------------------------------------------------------------

inline bool walk_rows(const CeArgs& a) { return a.C == 1 || a.x_sC == 1; }

template <class T, class A>
int ce_forward_t(const CeArgs& a) {
  const bool rows = walk_rows(a);
  return with_bool(a.w != nullptr, [&](auto HW) {
    constexpr bool hw = decltype(HW)::value;
    return with_bool(a.softcap > 0, [&](auto CP) {
      constexpr bool cp = decltype(CP)::value;
      if (a.t) {
        if (a.t_dtype_is_acc)
          return rows ? ce_fwd_prob_rows<T, A, A, hw, cp>(a) : ce_fwd_prob_tiles<T, A, A, hw, cp>(a);
        return rows ? ce_fwd_prob_rows<T, T, A, hw, cp>(a) : ce_fwd_prob_tiles<T, T, A, hw, cp>(a);
      }
      return with_bool(a.eps > 0, [&](auto SM) {
        constexpr bool sm = decltype(SM)::value;
        return rows ? ce_fwd_index_rows<T, A, hw, sm, cp>(a) : ce_fwd_index_tiles<T, A, hw, sm, cp>(a);
      });
    });
  });
}

template <class T, class A>
int ce_backward_t(const CeArgs& a) {
  const bool rows = walk_rows(a);
  return with_bool(a.w != nullptr, [&](auto HW) {
    constexpr bool hw = decltype(HW)::value;
    return with_bool(a.softcap > 0, [&](auto CP) {
      constexpr bool cp = decltype(CP)::value;
      if (a.t) {
        if (a.t_dtype_is_acc)
          return rows ? ce_bwd_prob_rows<T, A, A, hw, cp>(a) : ce_bwd_prob_tiles<T, A, A, hw, cp>(a);
        return rows ? ce_bwd_prob_rows<T, T, A, hw, cp>(a) : ce_bwd_prob_tiles<T, T, A, hw, cp>(a);
      }
      return with_bool(a.eps > 0, [&](auto SM) {
        constexpr bool sm = decltype(SM)::value;
        return rows ? ce_bwd_index_rows<T, A, hw, sm, cp>(a) : ce_bwd_index_tiles<T, A, hw, sm, cp>(a);
      });
    });
  });
}

inline int ce_forward(const CeArgs& a) {
  switch (a.dtype) {
    case Dtype::F32: return ce_forward_t<float, float>(a);
    case Dtype::F16: return ce_forward_t<half_t, float>(a);
    case Dtype::BF16: return ce_forward_t<bf16_t, float>(a);
    case Dtype::F64: return ce_forward_t<double, double>(a);
  }
  return 0;
}

inline int ce_backward(const CeArgs& a) {
  switch (a.dtype) {
    case Dtype::F32: return ce_backward_t<float, float>(a);
    case Dtype::F16: return ce_backward_t<half_t, float>(a);
    case Dtype::BF16: return ce_backward_t<bf16_t, float>(a);
    case Dtype::F64: return ce_backward_t<double, double>(a);
  }
  return 0;
}
