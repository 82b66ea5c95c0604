// Cross-entropy CPU kernels. Compiled once per instruction set by isa_instantiate.h (no include guard;
// the only #include is walk.h, pasted into the same namespace like vec.h). CeArgs is defined in
// cross_entropy.cpp. The two walk orders (rows / tiles) and the online log-sum-exp are in walk.h.
//
// Forward: log-sum-exp (plus what label smoothing or a probability target needs) in one pass over
// memory; backward recomputes p = exp(x - lse) rather than storing an N x C softmax.
//
// Options: label smoothing eps, class weights w, z-loss z * lse^2 (PaLM), logit soft-capping
// x' = cap * tanh(x / cap) (Gemma; all formulas below then hold for x'), and an in-place backward
// that writes the gradient over the logits.
//
// The saved lse is a double: the backward forms x - lse as (x - hi) - lo with lse = hi + lo split into
// two floats. A single fp32 lse would carry half an ulp of |lse| (5e-4 at |lse| = 1e4) into every
// probability of the row.

#include "walk.h"

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

// lse = hi + lo, both in the accumulation type.
template <class A>
inline void split_lse(double lse, A* hi, A* lo) {
  const A h = A(lse);
  *hi = h;
  *lo = std::isfinite(double(h)) ? A(lse - double(h)) : A(0);
}

// In place the logits are gone once written, so a pass cannot be redone: the exact exp is taken per
// vector instead, where a lane left the normal range.
template <class V>
inline V vexp_checked(V e) {
  auto oob = mask_none(V());
  const V p = vexp_normal(e, oob);
  return mask_any(oob) ? vexp(e) : p;
}

// x as a value of its own: a product passed through it is rounded by itself, never fused into an FMA
// with what follows it (GCC contracts a * b - c * d as it sees fit, and which way may change with the
// code around it). A row of one class then gets p gp - g w_t = 0 exactly, as the two equal products round alike.
template <class A>
inline A rounded(A x) {
#ifdef LF_VEC_AVX2
  asm("" : "+x"(x));
#endif
  return x;
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

// One row's loss and lse; false for a target out of range (the loss then 0).
template <class T, class A, class O>
inline bool fwd_index_row(const CeArgs& a, O opt, const Consts<A>& k, const SoftCapOf<A, O>& cap, const T* x, int64_t y,
                          A* loss_out, double* lse_out) {
  const A* w = static_cast<const A*>(a.w);
  const int64_t C = a.C;
  A m;
  double logsum_d, dsum;
  row_stats_index<T, A>(opt, x, w, C, cap, &m, &logsum_d, &dsum);
  const double lse = double(m) + logsum_d;
  const A logsum = A(logsum_d);
  *lse_out = lse;
  A loss = 0;
  bool ok = true;
  if (y != a.ignore_index) {
    if (y < 0 || y >= C) {
      ok = false;
    } else {
      const A wy = opt.has_w ? w[y] : A(1);
      // (m - x_y) + log(sum) rather than lse - x_y: exact when the target holds the max logit.
      loss = k.keep * wy * ((m - cap(to_acc<A>(x[y]))) + logsum);
      // sum_c w_c (lse - x_c) = W (lse - m) - sum_c w_c (x_c - m): no cancellation of large logits.
      if (opt.smooth) loss += k.eps_c * (k.wsum * logsum - A(dsum));
      loss += A(double(k.z) * lse * lse);
    }
  }
  *loss_out = loss;
  return ok;
}

// Runs body(k, cap, r, n, s, &bad) over every row r = n * S + s of the call; returns bad.
template <class A, class O, class Body>
int for_each_row(const CeArgs& a, O opt, Body&& body) {
  const int64_t S = a.S, R = a.N * a.S;
  const Consts<A> k(a);
  const SoftCapOf<A, O> cap(opt.cap, a.softcap);
  int bad = 0;
#pragma omp parallel for num_threads(a.nthreads) if (a.nthreads > 1) schedule(dynamic, a.chunk)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = r / S;
    body(k, cap, r, n, r - n * S, &bad);
  }
  return bad;
}

template <class T, class A, class O>
int ce_fwd_index_rows(const CeArgs& a, O opt) {
  const T* X = static_cast<const T*>(a.x);
  A* loss_out = static_cast<A*>(a.loss);
  return for_each_row<A>(a, opt, [&](const Consts<A>& k, const SoftCapOf<A, O>& cap, int64_t r, int64_t n, int64_t s,
                                     int* bad) {
    if (!fwd_index_row<T, A>(a, opt, k, cap, X + n * a.x_sN + s * a.x_sS, a.y[n * a.y_sN + s * a.y_sS], loss_out + r,
                             a.lse + r))
      flag_bad(bad);
  });
}

// The gradient of one counted row (0 <= y < C) for the upstream gradient g and the row's lse.
template <class T, class A, class O>
inline void bwd_index_row(const CeArgs& a, O opt, const Consts<A>& k, const SoftCapOf<A, O>& cap, const T* x, T* gx,
                          int64_t y, A g, double lse_d) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const A* w = static_cast<const A*>(a.w);
  const int64_t C = a.C;
  A hi, lo;
  split_lse(lse_d, &hi, &lo);
  const A lse = A(lse_d);
  const A wy = opt.has_w ? w[y] : A(1);
  const A xy_raw = to_acc<A>(x[y]);  // before the loop: in place, the loop overwrites it
  // d loss / d x'_c = p_c * kp - kw * w_c, less g * keep * wy at the target (patched below);
  // z-loss adds 2 z lse p_c. With soft-capping, times d x'/d x = 1 - tanh^2.
  const A kp = g * (k.keep * wy + (opt.smooth ? k.eps_c * k.wsum : A(0)) + A(2) * k.z * lse);
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
    A o = opt.smooth ? p * kp - kw * (opt.has_w ? w[c] : A(1)) : p * kp;
    if (opt.cap) o *= cap.slope(xr);
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
        if (opt.smooth) {
          o0 = opt.has_w ? fnmadd(kwv, V::load(w + c), o0) : o0 - kwv;
          o1 = opt.has_w ? fnmadd(kwv, V::load(w + c + W), o1) : o1 - kwv;
        }
        if (opt.cap) {
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
      if (opt.smooth) o = opt.has_w ? fnmadd(kwv, load_k(w + c, k, A(0)), o) : o - kwv;
      if (opt.cap) o = o * d;
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
  if (opt.smooth) gy += kw * (py * k.wsum - wy);
  if (opt.cap) gy *= cap.slope(xy_raw);
  put(gx + y, gy);
}

template <class T, class A, class O>
int ce_bwd_index_rows(const CeArgs& a, O opt) {
  const T* X = static_cast<const T*>(a.x);
  T* GX = static_cast<T*>(a.gx);
  const A* G = static_cast<const A*>(a.g);
  const int64_t C = a.C;
  return for_each_row<A>(a, opt, [&](const Consts<A>& k, const SoftCapOf<A, O>& cap, int64_t r, int64_t n, int64_t s,
                                     int* bad) {
    T* gx = GX + n * a.gx_sN + s * a.gx_sS;
    const int64_t y = a.y[n * a.y_sN + s * a.y_sS];
    if (y == a.ignore_index || y < 0 || y >= C) {
      if (y != a.ignore_index) flag_bad(bad);
      zero_row<T, A>(gx, C);
      return;
    }
    bwd_index_row<T, A>(a, opt, k, cap, X + n * a.x_sN + s * a.x_sS, gx, y, G[n * a.g_sN + s * a.g_sS], a.lse_in[r]);
  });
}

// Forward and gradient in one walk (the fused path, lossfuse/ops/cross_entropy.py): the gradient for
// the upstream gradient a.g (one value for every row) written while the row is still in cache, so the
// logits are read from memory once instead of twice. float32 and bfloat16 rows of up to
// kFusedMaxClasses classes without smoothing or soft-capping also take one exp per element
// (fused_row); every other row runs the forward and backward row bodies back to back -- for float64
// the same bits as the unfused kernels (gradcheck compares a retained graph's second backward, which
// is unfused, with the first).
template <class T, class A, class O>
int ce_fused_index_rows(const CeArgs& a, O opt) {
  const T* X = static_cast<const T*>(a.x);
  T* GX = static_cast<T*>(a.gx);
  const A* w = static_cast<const A*>(a.w);
  A* loss_out = static_cast<A*>(a.loss);
  const int64_t C = a.C, S = a.S, R = a.N * a.S;
  const Consts<A> k(a);
  const SoftCapOf<A, O> cap(opt.cap, a.softcap);
  const A g = static_cast<const A*>(a.g)[0];
  int bad = 0;
#pragma omp parallel num_threads(a.nthreads) if (a.nthreads > 1)
  {
  // fused_row's scratch row, one per thread and call (a thread_local in a shared library costs a
  // __tls_get_addr call per use, which GCC does not hoist out of loops).
  constexpr bool kOneExpType = !std::is_same_v<T, double> && !std::is_same_v<A, double>;
  const bool one_exp = kOneExpType && !opt.smooth && !opt.cap && C <= kFusedMaxClasses;
  std::unique_ptr<A[]> scratch(one_exp ? new A[C + Vec<A>::W] : nullptr);
#pragma omp for schedule(dynamic, a.chunk)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = r / S, s = r - n * S;
    const T* x = X + n * a.x_sN + s * a.x_sS;
    T* gx = GX + n * a.gx_sN + s * a.gx_sS;
    const int64_t y = a.y[n * a.y_sN + s * a.y_sS];
    const bool live = y != a.ignore_index && y >= 0 && y < C;
    if (one_exp && live) {
      const T* next = r + 1 < R ? X + (r + 1) / S * a.x_sN + (r + 1) % S * a.x_sS : nullptr;
      const A wy = opt.has_w ? w[y] : A(1);
      const A xy = to_acc<A>(x[y]);
      A m, loss = 0;
      double logsum, rest, top, lse = 0;
      const bool done = fused_row<T, A>(x, gx, scratch.get(), C, a.stream, next, &m, &logsum, &rest, &top,
                                        [&](A mm, double ls) {
        lse = double(mm) + ls;
        // As fwd_index_row and bwd_index_row (no smoothing, no cap: keep = 1 - eps = 1).
        loss = k.keep * wy * ((mm - xy) + A(ls)) + A(double(k.z) * lse * lse);
        return g * (k.keep * wy + A(2) * k.z * A(lse));
      });
      if (done) {
        const A py_minus_1 = fused_py_minus_1<A>(xy, m, logsum, rest, top);
        // Without z-loss the second term is a zero (lse and p_y are finite here): p_y's exp is skipped.
        const A zterm = k.z != A(0) ? A(2) * k.z * A(lse) * fused_py<A>(xy, m, logsum, rest, top) : A(0);
        put(gx + y, g * (k.keep * wy * py_minus_1 + zterm));
        loss_out[r] = loss;
        a.lse[r] = lse;
        continue;
      }
    }
    if (!fwd_index_row<T, A>(a, opt, k, cap, x, y, loss_out + r, a.lse + r)) flag_bad(&bad);
    if (live)
      bwd_index_row<T, A>(a, opt, k, cap, x, gx, y, g, a.lse[r]);
    else
      zero_row<T, A>(gx, C);
  }
  }
  return bad;
}

// Probability targets, t'_c = t_c (1 - eps) + eps / C:
//   loss = sum_c w_c t'_c (lse - x'_c) = log(sum) * sum_c w_c t'_c - sum_c w_c t'_c (x'_c - m).
template <class T, class TT, class A, class O>
inline void block_sums_prob(O opt, const T* x, const TT* t, const A* w, int64_t n, A m, const Consts<A>& k,
                            const SoftCapOf<A, O>& cap, double* sum, double* top, double* tw, double* twd) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const V mv(m), keepv(k.keep), epscv(k.eps_c);
  V s0(A(0)), t0(A(0)), w0(A(0)), d0(A(0));
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const V e = cap(V::load(x + c)) - mv;
    add_exp_term(e, s0, t0);
    V wt = fmadd(V::load(t + c), keepv, epscv);
    if (opt.has_w) wt = wt * V::load(w + c);
    w0 = w0 + wt;
    d0 = fmadd(wt, e, d0);
  }
  if (c < n) {  // the last, partial vector
    const int kk = int(n - c);
    const typename V::Mask on = V::first(kk);
    const V e = cap(load_k(x + c, kk, A(0))) - mv;
    add_exp_term(e, s0, t0, on);
    V wt = fmadd(load_k(t + c, kk, A(0)), keepv, epscv);
    if (opt.has_w) wt = wt * load_k(w + c, kk, A(0));
    wt = select(on, wt, V(A(0)));
    w0 = w0 + wt;
    d0 = fmadd(wt, select(on, e, V(A(0))), d0);
  }
  double sd = double(hsum(s0)), twd_ = double(hsum(d0)), tw_ = double(hsum(w0));
  *sum += sd;
  *top += double(hsum(count_value(t0)));
  *tw += tw_;
  *twd += twd_;
}

template <class T, class TT, class A, class O>
int ce_fwd_prob_rows(const CeArgs& a, O opt) {
  const T* X = static_cast<const T*>(a.x);
  const TT* TG = static_cast<const TT*>(a.t);
  const A* w = static_cast<const A*>(a.w);
  A* loss_out = static_cast<A*>(a.loss);
  const int64_t C = a.C;
  return for_each_row<A>(a, opt, [&](const Consts<A>& k, const SoftCapOf<A, O>& cap, int64_t r, int64_t n, int64_t s,
                                     int*) {
    const T* x = X + n * a.x_sN + s * a.x_sS;
    const TT* t = TG + n * a.t_sN + s * a.t_sS;
    double sum = 0, top = 0, tw = 0, twd = 0;
    const A m = online_row_walk<A>(
        C, sum, top, [&](int64_t c0, int64_t nb) { return cap(block_max<T, A>(x + c0, nb)); },
        [&](int64_t c0, int64_t nb, A mm) {
          block_sums_prob<T, TT, A>(opt, x + c0, t + c0, opt.has_w ? w + c0 : w, nb, mm, k, cap, &sum, &top, &tw, &twd);
        },
        [&](double dm) { twd += dm * tw; }, [&] { tw = twd = 0; });
    const double logsum = log_sum(sum, top);
    const double lse = double(m) + logsum;
    a.lse[r] = lse;
    loss_out[r] = A(logsum * tw - twd + double(k.z) * lse * lse);
  });
}

template <class T, class TT, class A, class O>
int ce_bwd_prob_rows(const CeArgs& a, O opt) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const T* X = static_cast<const T*>(a.x);
  const TT* TG = static_cast<const TT*>(a.t);
  T* GX = static_cast<T*>(a.gx);
  TT* GT = static_cast<TT*>(a.gt);
  const A* w = static_cast<const A*>(a.w);
  const A* G = static_cast<const A*>(a.g);
  const int64_t C = a.C;
  return for_each_row<A>(a, opt, [&](const Consts<A>& k, const SoftCapOf<A, O>& cap, int64_t r, int64_t n, int64_t s,
                                     int*) {
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
        if (opt.has_w) o = o * V::load(w + c);
        o.store(gt + c);
      }
      for (; c < C; ++c) put(gt + c, g * k.keep * (opt.has_w ? w[c] : A(1)) * ((hi - cap(to_acc<A>(x[c]))) + lo));
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
          w0 = w0 + (opt.has_w ? wt * V::load(w + c) : wt);
        }
        tw += double(hsum(w0));
      }
      for (; c < C; ++c) tw += double((to_acc<A>(t[c]) * k.keep + k.eps_c) * (opt.has_w ? w[c] : A(1)));
      T* gx = GX + n * a.gx_sN + s * a.gx_sS;
      const A gp = g * (A(tw) + A(2) * k.z * lse);
      const V gpv(gp);
      run_backward_pass<V>(a.inplace, [&](auto&& vexp_fn) {
        int64_t c = 0;
        for (; c + W <= C; c += W) {
          V wt = fmadd(V::load(t + c), keepv, epscv);
          if (opt.has_w) wt = wt * V::load(w + c);
          V xc, slope;
          cap.with_slope(V::load(x + c), xc, slope);
          V o = fnmadd(gv, wt, vexp_fn((xc - hv) - lv) * gpv);
          if (opt.cap) o = o * slope;
          o.store(gx + c);
        }
        for (; c < C; ++c) {
          const A wt = (to_acc<A>(t[c]) * k.keep + k.eps_c) * (opt.has_w ? w[c] : A(1));
          const A xr = to_acc<A>(x[c]);
          put(gx + c, (rounded(sexp((cap(xr) - hi) - lo) * gp) - rounded(g * wt)) * cap.slope(xr));
        }
      });
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Tile walk (Tile, tile_max, fold / unfold: walk.h).
// ------------------------------------------------------------------------------------------------

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

// A tile's targets (walk.h), each with its class weight as fy.
template <class T, class A, class O>
inline void ce_tile_targets(const CeArgs& a, O opt, const Tile<A>& tl, const T* x, const A* w, TileTargets<A>& tt,
                            int* bad) {
  tile_targets<T, A>(a, tl, x, tt, bad, [&](int64_t y) { return opt.has_w ? w[y] : A(1); });
}

// What the forward of a one-exp fused tile hands its gradient sweep (fused_grad_tile): the targets,
// and per lane 1 / S (S = sum_c exp(x_c - m)) and p_y - 1.
template <class A>
struct TileKept {
  TileTargets<A> tt;
  Vec<A> inv_sum[kU], py_minus_1[kU];
};

// One tile's losses and lses (the forward of ce_fwd_index_tiles and ce_fused_index_tiles).
// With `buf` and `kept`, the exps are kept for the one-exp gradient (tile_stats) and `kept` filled;
// returns false when some exp left the normal range (nothing is then usable).
// (`tt` receives the targets: kept->tt, or the caller's own.)
template <class T, class A, class O>
inline bool fwd_index_tile_into(const CeArgs& a, O opt, const Consts<A>& k, const SoftCapOf<A, O>& cap,
                                const Tile<A>& tl, int* bad, A* buf, TileKept<A>* kept, TileTargets<A>& tt) {
  using V = Vec<A>;
  constexpr int W = V::W, L = Tile<A>::L;
  const T* X = static_cast<const T*>(a.x);
  const A* w = static_cast<const A*>(a.w);
  A* loss_out = static_cast<A*>(a.loss);
  const int64_t C = a.C, S = a.S, sC = a.x_sC;
  {
    const T* x = X + tl.n * a.x_sN + tl.s0;
    V m[kU];
    double sum[L] = {}, top[L] = {}, dsum[L];
    if (opt.smooth)  // (a tile is a few hundred elements: zeroing what it does not use shows)
      for (int j = 0; j < L; ++j) dsum[j] = 0;
    auto oob = mask_none(V());
    tile_stats<T, A>(opt, x, C, sC, tl, cap, w, m, sum, top, dsum, buf, &oob);
    if (buf) {
      if (mask_any(oob)) return false;
      for (int u = 0; u < kU; ++u) {  // a lane of -inf (or NaN) logits: the two-exp way decides what it gives
        A mb[W];
        m[u].store(mb);
        for (int j = 0; j < tl.kv(u); ++j)
          if (!(std::abs(mb[j]) < std::numeric_limits<A>::infinity())) return false;
      }
    }
    ce_tile_targets<T, A>(a, opt, tl, x, w, tt, bad);
    for (int u = 0; u < kU; ++u) {
      const int kv = tl.kv(u);
      if (!kv) continue;
      const V rest = unfold<A>(sum + u * W), tops = unfold<A>(top + u * W);
      const V logsum = log_sum(rest, tops);
      if (kept) {
        A ib[W];
        for (int j = 0; j < W; ++j) ib[j] = A(1.0 / (sum[u * W + j] + top[u * W + j]));
        const V inv = V::load(ib);
        kept->inv_sum[u] = inv;
        // As fused_py_minus_1: -(S - 1) / S from the other terms where the target holds the max (p_y
        // may be near 1 there), expm1 elsewhere (p_y < 1/2: no cancellation).
        const V xy = V::load(tt.xy + u * W);
        kept->py_minus_1[u] = select(cmp_eq(xy, m[u]), vneg((rest + (tops - V(A(1)))) * inv),
                                     vexpm1((xy - m[u]) - logsum));
      }
      const int64_t r0 = tl.n * S + tl.s0 + u * W;
      A mb[W], lb[W];
      m[u].store(mb);
      logsum.store(lb);
      for (int j = 0; j < kv; ++j)
        a.lse[r0 + j] = mb[j] == -std::numeric_limits<A>::infinity() ? -HUGE_VAL : double(mb[j]) + double(lb[j]);
      V loss = V(k.keep) * V::load(tt.fy + u * W) * ((m[u] - cap(V::load(tt.xy + u * W))) + logsum);
      if (opt.smooth) loss = loss + V(k.eps_c) * (V(k.wsum) * logsum - unfold<A>(dsum + u * W));
      const V lse = m[u] + logsum;
      loss = fmadd(V(k.z) * lse, lse, loss);
      store_k(select(V::mask(tt.live + u * W), loss, V(A(0))), loss_out + r0, kv);
    }
  }
  return true;
}

template <class T, class A, class O>
inline bool fwd_index_tile(const CeArgs& a, O opt, const Consts<A>& k, const SoftCapOf<A, O>& cap, const Tile<A>& tl,
                           int* bad, A* buf = nullptr, TileKept<A>* kept = nullptr) {
  if (kept) return fwd_index_tile_into<T, A>(a, opt, k, cap, tl, bad, buf, kept, kept->tt);
  TileTargets<A> tt;
  return fwd_index_tile_into<T, A>(a, opt, k, cap, tl, bad, buf, kept, tt);
}

// The tile walk of the calls below, with their constants: body(b, opt, k, cap, tile, &bad, buf) per tile
// (walk_tiles in walk.h; `gathered`: short rows, gathers_short_rows).
template <class T, class TT, class A, class O, class Body>
int ce_walk_tiles(const CeArgs& a, O opt, bool gathered, bool want_buf, Body&& body) {
  const Consts<A> k(a);
  const SoftCapOf<A, O> cap(opt.cap, a.softcap);
  return walk_tiles<T, TT, A>(
      a, gathered, want_buf, a.chunk,
      [](CeArgs& b, int64_t r0) {  // the per-row outputs and saved lse of a gathered tile start at its row r0
        if (b.loss) b.loss = static_cast<A*>(b.loss) + r0;
        if (b.lse) b.lse += r0;
        if (b.lse_in) b.lse_in += r0;
      },
      [&](const CeArgs& b, const Tile<A>& tl, int* bad, A* buf) { body(b, opt, k, cap, tl, bad, buf); });
}

// A ce_walk_tiles body from a tile function f(a, opt, k, cap, tile, bad) that keeps no exps.
template <class F>
inline auto without_buf(F f) {
  return [f](const CeArgs& b, auto opt, const auto& k, const auto& cap, const auto& tl, int* bad, auto*) {
    f(b, opt, k, cap, tl, bad);
  };
}

template <class T, class A, class O>
int ce_fwd_index_tiles(const CeArgs& a, O opt, bool gathered) {
  return ce_walk_tiles<T, T, A>(a, opt, gathered, false, without_buf([](auto&&... args) { fwd_index_tile<T, A>(args...); }));
}

// One tile's input gradient from the saved lses (the backward of ce_bwd_index_tiles, and of the fused
// walk's tiles that keep no exps).
template <class T, class A, class O>
inline void bwd_index_tile(const CeArgs& a, O opt, const Consts<A>& k, const SoftCapOf<A, O>& cap, const Tile<A>& tl,
                           int* bad) {
  using V = Vec<A>;
  constexpr int W = V::W, L = Tile<A>::L;
  const T* X = static_cast<const T*>(a.x);
  T* GX = static_cast<T*>(a.gx);
  const A* w = static_cast<const A*>(a.w);
  const A* G = static_cast<const A*>(a.g);
  const int64_t C = a.C, S = a.S, sC = a.x_sC, gsC = a.gx_sC;
  {
    const T* x = X + tl.n * a.x_sN + tl.s0;
    T* gx = GX + tl.n * a.gx_sN + tl.s0;
    TileTargets<A> tt;  // reads the target logits before anything is written (in place)
    ce_tile_targets<T, A>(a, opt, tl, x, w, tt, bad);
    alignas(32) A g[L] = {}, gy[L] = {};
    for (int j = 0; j < tl.k; ++j)
      if (tt.live[j]) g[j] = G[tl.n * a.g_sN + (tl.s0 + j) * a.g_sS];
    TileGrad<A> tg;
    V lsev[kU];
    alignas(32) A yf[L];
    for (int j = 0; j < L; ++j) yf[j] = tt.live[j] ? A(tt.y[j]) : A(-1);
    for (int u = 0; u < kU; ++u) {
      tg.kp[u] = tg.kw[u] = tg.hi[u] = tg.lo[u] = lsev[u] = V(A(0));
      tg.on[u] = mask_none(V());
      tg.y[u] = V::load(yf + u * W);
      const int kv = tl.kv(u);
      if (!kv) continue;
      const V gv = V::load(g + u * W), wyv = V::load(tt.fy + u * W);
      tile_lse(a.lse_in + tl.n * S + tl.s0 + u * W, tl, u, tg.hi + u, tg.lo + u, lsev + u);
      tg.kp[u] = gv * (V(k.keep) * wyv + V(opt.smooth ? k.eps_c * k.wsum : A(0)) + V(A(2) * k.z) * lsev[u]);
      tg.kw[u] = gv * V(k.eps_c);
      tg.on[u] = V::mask(tt.live + u * W);
    }
    // Per lane, sum_{c != y} p_c for the target element (see ce_bwd_index_rows).
    double rest[L];
    run_backward_pass<V>(a.inplace, [&](auto&& vexp_fn) {
      tile_grad_pass<T, A>(opt, cap, x, gx, C, sC, gsC, tl, tg, w, rest, vexp_fn);
    });
    for (int u = 0; u < kU; ++u) {
      if (!tl.kv(u)) continue;
      const V gv = V::load(g + u * W), wyv = V::load(tt.fy + u * W);
      V xyc, slope, py, py_minus_1;
      cap.with_slope(V::load(tt.xy + u * W), xyc, slope);
      tile_target_p(xyc, tg.hi[u], tg.lo[u], rest + u * W, &py, &py_minus_1);
      V gyv = gv * (V(k.keep) * wyv * py_minus_1 + V(A(2) * k.z) * lsev[u] * py);
      if (opt.smooth) gyv = gyv + tg.kw[u] * (py * V(k.wsum) - wyv);
      if (opt.cap) gyv = gyv * slope;
      gyv.store(gy + u * W);
    }
    for (int j = 0; j < tl.k; ++j)
      if (tt.live[j]) put(gx + tt.y[j] * gsC + j, gy[j]);
  }
}

template <class T, class A, class O>
int ce_bwd_index_tiles(const CeArgs& a, O opt, bool gathered) {
  return ce_walk_tiles<T, T, A>(a, opt, gathered, false, without_buf([](auto&&... args) { bwd_index_tile<T, A>(args...); }));
}

// The gradient of a one-exp fused tile for the one upstream gradient a.g, in one sweep over the exps
// fwd_index_tile kept in `buf`: g w_y p_c = e_c (g w_y / S) off the target, g w_y (p_y - 1) on it, 0 in
// the lanes whose rows do not count. Each element is written once, from registers (no second visit to
// the target elements, no per-lane sums in the sweep).
template <class T, class A>
inline void fused_grad_tile(const CeArgs& a, const Consts<A>& k, const Tile<A>& tl, const A* buf,
                            const TileKept<A>& kept) {
  using V = Vec<A>;
  constexpr int W = V::W, L = Tile<A>::L;
  T* gx = static_cast<T*>(a.gx) + tl.n * a.gx_sN + tl.s0;
  const int64_t C = a.C, gsC = a.gx_sC;
  const A g = static_cast<const A*>(a.g)[0];
  V f[kU], gy[kU], yv[kU];
  typename V::Mask on[kU];
  alignas(32) A yf[L];
  for (int j = 0; j < L; ++j) yf[j] = kept.tt.live[j] ? A(kept.tt.y[j]) : A(-1);
  for (int u = 0; u < kU; ++u) {
    const V gw = V(g) * (V(k.keep) * V::load(kept.tt.fy + u * W));
    f[u] = gw * kept.inv_sum[u];
    gy[u] = gw * kept.py_minus_1[u];
    yv[u] = V::load(yf + u * W);
    on[u] = V::mask(kept.tt.live + u * W);
  }
  for (int64_t c = 0; c < C; ++c) {
    prefetch_tile_ahead<T, A>(gx, c, gsC, true);
    const V cv{A(c)};
    for (int u = 0; u < kU; ++u) {
      const int kv = tl.kv(u);
      if (!kv) continue;
      const V o = select(cmp_eq(yv[u], cv), gy[u], V::load(buf + c * L + u * W) * f[u]);
      store_k(select(on[u], o, V(A(0))), gx + c * gsC + u * W, kv);
    }
  }
}

// Classes a one-exp fused tile may have: its exps (C x L floats, 64 bytes a class) stay in L1/L2
// between the forward and the gradient.
constexpr int64_t kFusedTileMaxClasses = 1024;

// The fused walk of the tile layout: each tile's forward, then its gradient for the one upstream
// gradient a.g while the tile (C x L elements, a few KiB) is still in L1 -- the logits are read from
// memory once instead of twice. float32 and bfloat16 tiles without smoothing, soft-capping or z-loss keep
// their exps from the forward (one exp per element, as fused_row); others, and a tile whose logits
// spread past the normal range, run the unfused tile bodies back to back (their bits). The loss and
// lse are the unfused forward's bits either way.
template <class T, class A, class O>
int ce_fused_index_tiles(const CeArgs& a, O opt, bool gathered) {
  constexpr bool kOneExpType = !std::is_same_v<T, double> && !std::is_same_v<A, double>;
  // (In place, the gradient pass would overwrite the logits the exps came from before a redo; gathered
  // tiles work on a copy.)
  const bool one_exp = kOneExpType && !opt.smooth && !opt.cap && a.z_loss == 0 && a.C <= kFusedTileMaxClasses &&
                       (gathered || !a.inplace);
  return ce_walk_tiles<T, T, A>(a, opt, gathered, one_exp, [](const CeArgs& b, O o, const Consts<A>& k,
                                                           const SoftCapOf<A, O>& cap, const Tile<A>& tl, int* bad,
                                                           A* buf) {
    if (buf) {
      TileKept<A> kept;  // (only here: zeroing its targets per tile is not free)
      if (fwd_index_tile<T, A>(b, o, k, cap, tl, bad, buf, &kept)) {
        fused_grad_tile<T, A>(b, k, tl, buf, kept);
        return;
      }
    }
    fwd_index_tile<T, A>(b, o, k, cap, tl, bad);
    bwd_index_tile<T, A>(b, o, k, cap, tl, bad);
  });
}

// One tile's losses and lses for a probability target (TT its storage type).
template <class T, class TT, class A, class O>
inline void fwd_prob_tile(const CeArgs& a, O opt, const Consts<A>& k, const SoftCapOf<A, O>& cap, const Tile<A>& tl,
                          int*) {
  using V = Vec<A>;
  constexpr int W = V::W, L = Tile<A>::L;
  const A* w = static_cast<const A*>(a.w);
  A* loss_out = static_cast<A*>(a.loss);
  const int64_t C = a.C, S = a.S, sC = a.x_sC, tsC = a.t_sC;
  {
    const T* x = static_cast<const T*>(a.x) + tl.n * a.x_sN + tl.s0;
    const TT* t = static_cast<const TT*>(a.t) + tl.n * a.t_sN + tl.s0;
    V m[kU];
    tile_max<T, A>(x, C, sC, tl, cap, m);
    double sum[L] = {}, top[L] = {}, tw[L] = {}, twd[L] = {};
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t c1 = c0 + kBlock < C ? c0 + kBlock : C;
      V sv[kU], tv[kU], wv[kU], dv[kU];
      for (int u = 0; u < kU; ++u) sv[u] = tv[u] = wv[u] = dv[u] = V(A(0));
      for (int64_t c = c0; c < c1; ++c) {
        for (int u = 0; u < kU; ++u) {
          const int kv = tl.kv(u);
          if (!kv) continue;
          const V e = cap(load_k(x + c * sC + u * W, kv, A(0))) - m[u];
          add_exp_term(e, sv[u], tv[u]);
          V wt = fmadd(load_k(t + c * tsC + u * W, kv, A(0)), V(k.keep), V(k.eps_c));
          if (opt.has_w) wt = wt * V(w[c]);
          wv[u] = wv[u] + wt;
          dv[u] = fmadd(wt, e, dv[u]);
        }
      }
      for (int u = 0; u < kU; ++u) {
        fold(sv[u], sum + u * W);
        fold(count_value(tv[u]), top + u * W);
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
      log_sum(unfold<A>(sum + u * W), unfold<A>(top + u * W)).store(lb);
      for (int j = 0; j < kv; ++j) {
        const int l = u * W + j;
        const double logsum = double(lb[j]);
        const double lse = mb[j] == -std::numeric_limits<A>::infinity() ? -HUGE_VAL : double(mb[j]) + logsum;
        a.lse[r0 + j] = lse;
        loss_out[r0 + j] = A(logsum * tw[l] - twd[l] + double(k.z) * lse * lse);
      }
    }
  }
}

template <class T, class TT, class A, class O>
int ce_fwd_prob_tiles(const CeArgs& a, O opt, bool gathered) {
  return ce_walk_tiles<T, TT, A>(a, opt, gathered, false, without_buf([](auto&&... args) { fwd_prob_tile<T, TT, A>(args...); }));
}

// One tile's input and target gradients for a probability target, from the saved lses.
template <class T, class TT, class A, class O>
inline void bwd_prob_tile(const CeArgs& a, O opt, const Consts<A>& k, const SoftCapOf<A, O>& cap, const Tile<A>& tl,
                          int*) {
  using V = Vec<A>;
  constexpr int W = V::W, L = Tile<A>::L;
  T* GX = static_cast<T*>(a.gx);
  TT* GT = static_cast<TT*>(a.gt);
  const A* w = static_cast<const A*>(a.w);
  const A* G = static_cast<const A*>(a.g);
  const int64_t C = a.C, S = a.S, sC = a.x_sC, tsC = a.t_sC;
  {
    const T* x = static_cast<const T*>(a.x) + tl.n * a.x_sN + tl.s0;
    const TT* t = static_cast<const TT*>(a.t) + tl.n * a.t_sN + tl.s0;
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
          if (opt.has_w) o = o * V(w[c]);
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
            wv[u] = wv[u] + (opt.has_w ? wt * V(w[c]) : wt);
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
            if (opt.has_w) wt = wt * V(w[c]);
            V xc, slope;
            cap.with_slope(load_k(x + c * sC + u * W, kv, A(0)), xc, slope);
            V o = fnmadd(gv[u], wt, vexp_fn((xc - hv[u]) - lv[u]) * gp[u]);
            if (opt.cap) o = o * slope;
            store_k(o, gx + c * a.gx_sC + u * W, kv);
          }
      });
    }
  }
}

template <class T, class TT, class A, class O>
int ce_bwd_prob_tiles(const CeArgs& a, O opt, bool gathered) {
  return ce_walk_tiles<T, TT, A>(a, opt, gathered, false, without_buf([](auto&&... args) { bwd_prob_tile<T, TT, A>(args...); }));
}

// ------------------------------------------------------------------------------------------------
// Entry point: the dtype, the optional terms, the target's storage type and the walk order (from the
// strides) become template arguments here, once per call.
// ------------------------------------------------------------------------------------------------

inline bool walk_rows(const CeArgs& a) { return a.C == 1 || a.x_sC == 1; }

template <class T, class A>
int ce_run_t(const CeArgs& a, CePass pass) {
  const bool rows = walk_rows(a);
  // The fused walk exists for class-index targets (both walk orders); probability targets run the
  // forward and the backward kernels one after the other (same results, no saving).
  if (pass == CePass::kFused && a.t) {
    const int bad = ce_run_t<T, A>(a, CePass::kForward);
    return ce_run_t<T, A>(a, CePass::kBackward) | bad;
  }
  // Smoothing of a probability target is in its t' (Consts), not a term of the sums.
  return with_terms(a.w != nullptr, !a.t && a.eps > 0, a.softcap > 0, [&](auto opt) {
    // Short rows are gathered into tiles (see kShortRowMaxClasses in walk.h).
    const bool gathered = rows && gathers_short_rows(a);
    if (a.t) {
      auto prob = [&](auto tt) {
        using TT = decltype(tt);
        if (rows && !gathered)
          return pass == CePass::kForward ? ce_fwd_prob_rows<T, TT, A>(a, opt) : ce_bwd_prob_rows<T, TT, A>(a, opt);
        return pass == CePass::kForward ? ce_fwd_prob_tiles<T, TT, A>(a, opt, gathered)
                                        : ce_bwd_prob_tiles<T, TT, A>(a, opt, gathered);
      };
      return a.t_dtype_is_acc ? prob(A{}) : prob(T{});
    }
    if (rows && !gathered) {
      switch (pass) {
        case CePass::kFused: return ce_fused_index_rows<T, A>(a, opt);
        case CePass::kForward: return ce_fwd_index_rows<T, A>(a, opt);
        case CePass::kBackward: return ce_bwd_index_rows<T, A>(a, opt);
      }
    }
    switch (pass) {
      case CePass::kFused: return ce_fused_index_tiles<T, A>(a, opt, gathered);
      case CePass::kForward: return ce_fwd_index_tiles<T, A>(a, opt, gathered);
      case CePass::kBackward: break;
    }
    return ce_bwd_index_tiles<T, A>(a, opt, gathered);
  });
}

// Returns nonzero when some class index was out of range.
inline int ce_run(const CeArgs& a, CePass pass) {
  return with_dtype(a.dtype, [&](auto t, auto acc) { return ce_run_t<decltype(t), decltype(acc)>(a, pass); });
}
