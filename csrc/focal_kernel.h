// Focal-loss CPU kernels (sigmoid and softmax). Compiled once per instruction set by isa_instantiate.h
// (no include guard; the only #include is walk.h, pasted like vec.h). SigmoidFocalArgs and
// SoftmaxFocalArgs are defined in focal.cpp. Everything lives in the nested namespace `focal` so that
// no helper here can collide with another loss's.
#include "walk.h"

namespace focal {

// The per-vector helpers of the elementwise loops: GCC would otherwise keep some of them out of line
// (they are large), and a call per vector of 8 elements costs more than the work it saves.
#define LF_FOCAL_INLINE inline __attribute__((always_inline))

// ================================================================================================
// Sigmoid focal loss, elementwise (torchvision.ops.sigmoid_focal_loss).
//
// Per element, logit x and target t (soft targets: t in [0, 1]):
//   sigma = sigmoid(x), q = 1 - p_t = t (1 - sigma) + (1 - t) sigma,
//   ce = BCE-with-logits = t softplus(-x) + (1 - t) softplus(x),
//   alpha_t = alpha t + (1 - alpha)(1 - t)        (1 when alpha < 0),
//   loss = alpha_t ce q^gamma.
//
// Everything is written with e = exp(-|x|) in (0, 1], d = 1 / (1 + e) = sigmoid(|x|), so that
// sigmoid(|x|) = d and sigmoid(-|x|) = e d, and with the target seen from the logit's side:
//   (u, v) = (1 - t, t) for x >= 0,  (t, 1 - t) for x < 0        (u + v = 1; hard targets: {0, 1}).
// Then, exactly,
//   q  = (u + v e) d = w d,                    w := u + v e
//   ce = u |x| + log1p(e)                      (softplus(|x|) = |x| + log1p(e), softplus(-|x|) = log1p(e))
//   log q = log w - log1p(e),  log w = -|x| where u = 0 (the target agrees with the logit's sign: w = e),
//                              log w = 0    where v = 0 (it disagrees: w = 1),
// so log q comes from a log-sigmoid, never from the log of an underflowed probability, and
// q^gamma = exp(gamma log q) is exact down to 0 (gamma = 0 gives exactly 1).
//
// Gradient. d ce / dx = sigma - t and d q / dx = sigma' (1 - 2t) with sigma' = sigma (1 - sigma), so
//   d loss / dx = alpha_t [ (sigma - t) q^gamma + gamma ce q^(gamma-1) sigma' (1 - 2t) ]
//               = alpha_t q^gamma [ (sigma - t) + gamma ce (1 - 2t) r ],   r := sigma' / q.
// The factor q^(gamma-1), infinite at a saturated logit when gamma < 1 (torchvision's autograd gives
// 0 * inf = NaN there), is gone: r is bounded. With sigma' = e d^2:
//   r = e d / w          (= d exactly where u = 0: the e cancels; no 0/0 when e underflows),
//   sigma - t = s (u - v e) d,   1 - 2t = s (u - v),   s = +1 for x >= 0, -1 for x < 0,
// and therefore
//   d loss / dx = s alpha_t q^gamma [ (u - v e) d + gamma ce (u - v) r ].
// For hard targets u - v e is u or -e (no cancellation), so a confident prediction's tiny gradient
// keeps its relative precision. Every term is finite for finite x and every gamma >= 0. Choices
// between branches are selects, never multiplies by 0/1 (0 * inf = NaN).
//
// For gamma == 2 (the default) q^2 is formed as q * q with q = w d: e d, d or w d, each a product of
// exactly computed factors (no cancellation, no 1 - p), so it is as exact as exp(2 log q) -- where q
// itself is subnormal q^2 is 0 in either form -- and saves an exp per element.
//
// The forward can also write the gradient (the fused path, lossfuse/ops/focal.py): the pieces above
// are then computed once for both.
// ================================================================================================

template <class A>
struct SigmoidConsts {
  Vec<A> gamma, alpha, one_minus_alpha;
  explicit SigmoidConsts(const SigmoidFocalArgs& a)
      : gamma(A(a.gamma)), alpha(A(a.alpha)), one_minus_alpha(A(1) - A(a.alpha)) {}
};

// e^x for x <= 0 (or NaN): the fast exp wherever e^x is a normal float, the exact vexp for a vector
// with a lane below that -- rare, and then the subnormal values a loss-scaled gradient can still hold
// are kept. One lane (portable, double): libm.
template <class A>
LF_FOCAL_INLINE Vec<A> exp_nonpos(Vec<A> x) {
  if constexpr (Vec<A>::W == 1) {
    return vexp(x);
  } else {
    auto oob = mask_none(x);
    const Vec<A> e = vexp_normal(x, oob);
    return mask_any(oob) ? vexp(x) : e;
  }
}

// d = sigmoid(|x|) = 1 / (1 + e) and l1 = log(1 + e) for e = exp(-|x|) in [0, 1].
// log(1 + e) = 2 atanh(s), s = e / (2 + e) in [0, 1/3]: 2 s (1 + z/3 + z^2/5 + ... + z^7/15) with
// z = s^2 <= 1/9 (truncation below 2e-9 relative) -- a quarter of the general vlog1p's work, and
// relatively exact for tiny e (log1p(e) = e there). Both quotients come from one division,
// r = 1 / ((1 + e)(2 + e)): d = (2 + e) r, s = e (1 + e) r (within 2 ulp). Double: libm.
template <class A>
LF_FOCAL_INLINE void sigmoid_and_log1p(Vec<A> e, Vec<A>& d, Vec<A>& l1) {
  using V = Vec<A>;
  const V one(A(1));
  if constexpr (std::is_same_v<A, double>) {
    d = one / (one + e);
    l1 = vlog1p(e);
  } else {
    const V e1 = one + e, e2 = V(A(2)) + e;
    const V r = one / (e1 * e2);
    d = e2 * r;
    const V s = e * e1 * r;
    const V z = s * s;
    V p(A(1) / A(15));
    p = fmadd(p, z, V(A(1) / A(13)));
    p = fmadd(p, z, V(A(1) / A(11)));
    p = fmadd(p, z, V(A(1) / A(9)));
    p = fmadd(p, z, V(A(1) / A(7)));
    p = fmadd(p, z, V(A(1) / A(5)));
    p = fmadd(p, z, V(A(1) / A(3)));
    p = fmadd(p, z, one);
    l1 = (s + s) * p;
  }
}

// The options that change the per-element math: an alpha term (alpha >= 0) and gamma == 2, for which
// q^2 is formed as q * q (see above). Each is std::true_type in the kernels built for torchvision's
// defaults (alpha = 0.25, gamma = 2: the common call, whose branches fold away) or a bool read at run
// time in the one set built for every other call: a test per vector on a value fixed for the call,
// beside an exp, a division and a polynomial. (A kernel per combination, times the forward's output
// forms, made this loss's instantiations the largest part of the extension's build.)
template <class HA, class G2>
struct SigmoidTerms {
  HA alpha;
  G2 gamma2;
};
using SigmoidDefaults = SigmoidTerms<std::true_type, std::true_type>;
using SigmoidAnyTerms = SigmoidTerms<bool, bool>;

// The loss and, with `grad`, d loss / d x of U vectors of elements. Every step is written for the
// U vectors side by side: their dependency chains (exp, division, polynomial) are long and
// independent, and interleaved they keep the FP pipes busy where one chain at a time leaves them
// waiting on latency. (A loss the caller does not use is dead code once this is inlined.)
template <class A, int U, class O>
LF_FOCAL_INLINE void sigmoid_focal_vecs(O opt, bool grad_too, const Vec<A>* x, const Vec<A>* t,
                                        const SigmoidConsts<A>& k, Vec<A>* loss, Vec<A>* grad) {
  using V = Vec<A>;
  using M = typename V::Mask;
  const V zero(A(0)), one(A(1));
  V t1[U], u[U], v[U], a[U], e[U], d[U], l1[U], ce[U], w[U], ed[U], f[U];
  M pos[U], agree[U];
  bool soft[U];
  for (int j = 0; j < U; ++j) {
    t1[j] = one - t[j];
    pos[j] = cmp_le(zero, x[j]);  // NaN: false, and the NaN flows through |x| below
    u[j] = select(pos[j], t1[j], t[j]);
    v[j] = select(pos[j], t[j], t1[j]);
    a[j] = vabs(x[j]);
  }
  for (int j = 0; j < U; ++j) e[j] = exp_nonpos(vneg(a[j]));
  for (int j = 0; j < U; ++j) sigmoid_and_log1p(e[j], d[j], l1[j]);
  for (int j = 0; j < U; ++j) {
    ce[j] = fmadd(u[j], a[j], l1[j]);
    agree[j] = cmp_eq(u[j], zero);
    // Soft targets need w = u + v e (and its log or a division by it); hard ones (u or v is 0)
    // never do, and whole vectors of hard targets -- the usual case -- skip that work.
    soft[j] = mask_any(cmp_lt(zero, vabs(u[j] * v[j])));
    w[j] = soft[j] ? fmadd(v[j], e[j], u[j]) : one;
    ed[j] = e[j] * d[j];
  }
  if (opt.gamma2) {
    for (int j = 0; j < U; ++j) {
      const V q = select(agree[j], ed[j], soft[j] ? w[j] * d[j] : d[j]);
      f[j] = q * q;
    }
  } else {
    for (int j = 0; j < U; ++j) {
      const V logw = select(agree[j], vneg(a[j]), soft[j] ? vlog(w[j]) : zero);
      f[j] = k.gamma * (logw - l1[j]);
    }
    for (int j = 0; j < U; ++j) f[j] = exp_nonpos(f[j]);  // q^gamma
  }
  for (int j = 0; j < U; ++j) {
    // alpha t + (1 - alpha)(1 - t): exactly alpha or 1 - alpha for hard targets.
    const V at = opt.alpha ? fmadd(k.alpha, t[j], k.one_minus_alpha * t1[j]) : one;
    loss[j] = at * ce[j] * f[j];
    if (grad_too) {
      const V r = select(agree[j], d[j], soft[j] ? ed[j] / w[j] : ed[j]);
      const V inner = fmadd(fnmadd(v[j], e[j], u[j]), d[j], k.gamma * ce[j] * (u[j] - v[j]) * r);
      const V g = at * f[j] * inner;
      grad[j] = select(pos[j], g, vneg(g));
    }
  }
}

// Lanes [k, W) of v set to 0 (the tail of a partial sum).
template <class A>
LF_FOCAL_INLINE Vec<A> keep_lanes(Vec<A> v, int k) {
  A b[Vec<A>::W];
  v.store(b);
  for (int j = k; j < Vec<A>::W; ++j) b[j] = A(0);
  return Vec<A>::load(b);
}

// The target vector of classes [c, c + W) of a row whose class index is y: 1 in lane y - c, if any.
template <class A>
LF_FOCAL_INLINE Vec<A> onehot_at(int64_t y, int64_t c) {
  constexpr int W = Vec<A>::W;
  if (y < c || y >= c + W) return Vec<A>(A(0));
  A b[W] = {};
  b[y - c] = A(1);
  return Vec<A>::load(b);
}

inline int64_t chunks_of(int64_t n, int64_t block) { return (n + block - 1) / block; }

// Loop iterations a thread takes at a time. Dynamic rather than static scheduling: on a machine
// shared with other work (data-loader workers, other jobs) a static split waits for the thread whose
// core is busiest; grabbing ~32k elements at a time costs one atomic per grab and lets the others
// take over its share. Every output is indexed by its iteration, so results do not depend on which
// thread ran what.
inline int64_t dynamic_grain(int64_t elements_per_iteration) {
  const int64_t g = (int64_t(1) << 15) / (elements_per_iteration > 0 ? elements_per_iteration : 1);
  return g > 0 ? g : 1;
}

// Vectors the elementwise loops handle at once (sigmoid_focal_vecs): four chains interleaved, then a
// pair and single vectors for what is left of a row or chunk.
constexpr int kSigmoidU = 4;

// Walks elements [i0, i1) of the flat input, handing `body(UC, i, k, t)` groups of UC::value
// vectors from offset i: kSigmoidU or 2 full vectors (k = W), or one vector with k live lanes at a
// tail, and their targets t. With `sum` (not null), adds what the body returns (its lanes [k, W) dropped) into *sum.
// Float targets are loaded; class-index targets (row length C, y == C: background) are built per row
// segment without a one-hot in memory. Returns false when a class index is out of [0, C].
//
// The body is taken by value and should capture by value: the vector stores are may-alias, and a
// pointer or an accumulator reached through a reference would be reloaded and spilled around each.
template <class A, class TT, bool INDEX, class Body>
LF_FOCAL_INLINE bool sigmoid_walk(const SigmoidFocalArgs& a, int64_t i0, int64_t i1, Vec<A>* sum, Body body) {
  using V = Vec<A>;
  constexpr int W = V::W, U = kSigmoidU;
  using Group = std::integral_constant<int, U>;
  using Pair = std::integral_constant<int, 2>;
  using One = std::integral_constant<int, 1>;
  V acc(A(0));
  bool ok = true;
  auto single = [&](int64_t i, int kk, V t) {
    const V l = body(One{}, i, kk, &t);
    if (sum) acc = acc + (kk < W ? keep_lanes(l, kk) : l);
  };
  auto pair = [&](int64_t i, V t0, V t1) {
    const V t[2] = {t0, t1};
    const V l = body(Pair{}, i, W, t);
    if (sum) acc = acc + l;
  };
  if (!INDEX) {
    const TT* tp = static_cast<const TT*>(a.t);
    int64_t i = i0;
    for (; i + U * W <= i1; i += U * W) {
      V t[U];
      for (int j = 0; j < U; ++j) t[j] = V::load(tp + i + j * W);
      const V l = body(Group{}, i, W, t);
      if (sum) acc = acc + l;
    }
    if (U > 2 && i + 2 * W <= i1) {
      pair(i, V::load(tp + i), V::load(tp + i + W));
      i += 2 * W;
    }
    for (; i + W <= i1; i += W) single(i, W, V::load(tp + i));
    if (i < i1) single(i, int(i1 - i), V::load_partial(tp + i, int(i1 - i), A(0)));
  } else {
    const int64_t C = a.C;
    int64_t n = i0 / C;
    int64_t i = i0;
    while (i < i1) {
      const int64_t row0 = n * C;
      const int64_t end = row0 + C < i1 ? row0 + C : i1;
      const int64_t y = a.y[n];
      if (y < 0 || y > C) ok = false;
      for (; i + U * W <= end; i += U * W) {
        V t[U];
        for (int j = 0; j < U; ++j) t[j] = onehot_at<A>(y, i + j * W - row0);
        const V l = body(Group{}, i, W, t);
        if (sum) acc = acc + l;
      }
      if (U > 2 && i + 2 * W <= end) {  // e.g. C = 80: two groups of 4 and a pair
        pair(i, onehot_at<A>(y, i - row0), onehot_at<A>(y, i + W - row0));
        i += 2 * W;
      }
      for (; i + W <= end; i += W) single(i, W, onehot_at<A>(y, i - row0));
      if (i < end) {
        single(i, int(end - i), onehot_at<A>(y, i - row0));
        i = end;
      }
      ++n;
    }
  }
  if (sum) *sum = acc;
  return ok;
}

// o to p, k lanes: streamed (non-temporal) when asked and the address allows.
template <class T, class A>
LF_FOCAL_INLINE void store_grad(Vec<A> o, T* p, int k, bool stream) {
  constexpr int W = Vec<A>::W;
  if (k == W && stream && reinterpret_cast<uintptr_t>(p) % (W * sizeof(T)) == 0)
    o.stream(p);
  else
    store_k(o, p, k);
}

// The one kernel of every sigmoid focal pass. The loss goes to `out` per element, or as one sum per
// a.block elements (`partial`), or nowhere (`out` null: the backward); the gradient, where `gx` is not
// null, is the upstream gradient times d loss / dx, formed in fp32 and cast once at the store: one
// upstream value for every element (`g_vec` null: the fused forward's grad_scale, a scalar grad) or
// one per element. The tests on these are once per group of vectors, on values fixed for the call.
template <class T, class TT, class A, bool INDEX, class O>
int sigmoid_t(const SigmoidFocalArgs& a, O opt, A* out, bool partial, T* gx, A g_scalar, const A* g_vec) {
  using V = Vec<A>;
  const T* const X = static_cast<const T*>(a.x);
  T* const GX = gx;
  const A* const G = g_vec;
  const SigmoidConsts<A> k(a);
  const V gs(g_scalar);
  const bool stream = a.stream, grad_too = gx != nullptr, per_element = out && !partial;
  const int64_t chunks = chunks_of(a.numel, a.block);
  int bad = 0;
  const int64_t grain = dynamic_grain(a.block);
#pragma omp parallel for num_threads(a.nthreads) if (a.nthreads > 1) schedule(dynamic, grain)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t i0 = ch * a.block, i1 = i0 + a.block < a.numel ? i0 + a.block : a.numel;
    V sum(A(0));
    const bool ok = sigmoid_walk<A, TT, INDEX>(a, i0, i1, partial ? &sum : nullptr,
                                               [=](auto UC, int64_t i, int kk, const V* t) {
      constexpr int U = decltype(UC)::value;
      V x[U], l[U], g[U];
      for (int j = 0; j < U; ++j) x[j] = load_k(X + i + j * V::W, kk, A(0));
      sigmoid_focal_vecs<A, U>(opt, grad_too, x, t, k, l, g);
      V total = l[0];
      for (int j = 0; j < U; ++j) {
        if (j) total = total + l[j];
        if (per_element) store_k(l[j], out + i + j * V::W, kk);
        if (grad_too) {
          const V gv = G ? load_k(G + i + j * V::W, kk, A(0)) : gs;
          store_grad(gv * g[j], GX + i + j * V::W, kk, stream);
        }
      }
      return total;
    });
    if (partial) out[ch] = hsum(sum);
    if (!ok) flag_bad(&bad);
  }
  return bad;
}

template <class T, class A>
int sigmoid_run_t(const SigmoidFocalArgs& a, bool bwd) {
  A* const out = bwd ? nullptr : static_cast<A*>(a.out);
  T* const gx = static_cast<T*>(a.gx);
  const A* const g = static_cast<const A*>(a.g);
  // The backward's upstream gradient, or the fused forward's grad_scale (a.gx set only then).
  const A g_scalar = bwd ? (a.g_scalar ? g[0] : A(0)) : A(a.grad_scale);
  const A* const g_vec = bwd && !a.g_scalar ? g : nullptr;
  auto with_targets = [&](auto opt) {
    if (a.y) return sigmoid_t<T, A, A, true>(a, opt, out, a.partial, gx, g_scalar, g_vec);
    if (a.t_is_acc) return sigmoid_t<T, A, A, false>(a, opt, out, a.partial, gx, g_scalar, g_vec);
    return sigmoid_t<T, T, A, false>(a, opt, out, a.partial, gx, g_scalar, g_vec);
  };
  const bool alpha = a.alpha >= 0;
  // gamma == 2 is worth its own formula in float only; double keeps exp(gamma log q) for every gamma.
  const bool gamma2 = std::is_same_v<A, float> && a.gamma == 2.0;
  if constexpr (std::is_same_v<A, float>)
    if (alpha && gamma2) return with_targets(SigmoidDefaults{});
  return with_targets(SigmoidAnyTerms{alpha, gamma2});
}

inline int sigmoid_run(const SigmoidFocalArgs& a, bool bwd) {
  return with_dtype(a.dtype, [&](auto t, auto acc) { return sigmoid_run_t<decltype(t), decltype(acc)>(a, bwd); });
}

// ================================================================================================
// Softmax focal loss, per row (N, C, S), class-index targets.
//
// With lse the row's log-sum-exp, nl = lse - x_y = -log p_y, q = 1 - p_y = -expm1(-nl) and
// K = alpha_y w_y:
//   loss = K q^gamma nl.
// Gradient, from d p_y / d x_c = p_y ([c = y] - p_c):
//   d loss / d x_c = K [ q^gamma + gamma q^(gamma-1) p_y nl ] (p_c - [c = y])
//                  = D (p_c - [c = y]),     D := K q^gamma (1 + gamma p_y nl / q).
// nl / q = -log(1 - q) / q -> 1 as q -> 0, so D stays finite for every gamma >= 0 where the
// textbook form has q^(gamma-1) (0 * inf = NaN at a saturated row when gamma < 1). The forward
// writes D per row; the backward is then the cross-entropy backward with the per-row factor D:
// g D p_c off the target, g D (p_y - 1) at it, with p_y - 1 formed as -sum_{c != y} p_c when p_y > 1/2.
// With gamma = 0, q^gamma = 1 and D = K exactly, so loss and gradient are bit for bit those of the
// cross-entropy kernels with weight w (alpha = None).
// ================================================================================================

// loss and D of one row from K and nl (see above). The scalar math runs in double: once per row.
template <class A>
inline void focal_row(A K, A nl, double gamma, A* loss, A* dscale) {
  const double n = double(nl);
  const double q = -std::expm1(-n);
  // q^gamma = exp(gamma log q): q = 0 (p_y rounded to 1) gives 0 for gamma > 0, and gamma = 0 gives
  // exactly 1 without forming 0 * log 0.
  const double f = gamma == 0 ? 1.0 : std::exp(gamma * std::log(q));
  const double p = std::exp(-n);
  const double ratio = q > 0 ? n / q : 1.0;     // nl / q -> 1 as q -> 0
  const double pnl = p > 0 ? p * ratio : 0.0;   // p_y nl / q -> 0 as p_y -> 0 (nl -> inf)
  *loss = K * A(f) * nl;                        // K * 1 * nl: the cross-entropy's rounding at gamma = 0
  *dscale = A(double(K) * f * (1.0 + gamma * pnl));
}

template <class A>
inline A class_factor(const SoftmaxFocalArgs& a, const A* scale, int64_t y) {
  return scale ? A(a.alpha) * scale[y] : A(a.alpha);
}

// ---- Row walk (class stride 1) -------------------------------------------------------------------

// The gradient of one counted row: kp p_c off the target, kp (p_y - 1) at it, kp = g D formed in fp32
// and applied to every element before its single cast.
template <class T, class A>
inline void grad_row(const T* x, T* gx, int64_t C, int64_t y, A kp, A lse, bool stream) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const V kpv(kp), lv(lse);
  // p_y - 1 as -sum_{c != y} p_c for p_y near 1 (as the cross-entropy backward): no cancellation.
  double rest = 0;
  with_exact_redo<V>([&](auto&& vexp_fn) {
    rest = 0;
    int64_t c = 0;
    if (stream) {  // peel to the alignment streaming stores need
      for (; c < C && (reinterpret_cast<uintptr_t>(gx + c) % (W * sizeof(T))) != 0; ++c) {
        const A p = sexp(to_acc<A>(x[c]) - lse);
        if (c != y) rest += double(p);
        put(gx + c, p * kp);
      }
    }
    // Pairs of vectors as the cross-entropy backward walks them (so that gamma = 0 reproduces its
    // bits: the same vector/scalar split, the same order of the sums), two pairs per step where
    // possible: their exps are independent chains, interleaved.
    while (c + 2 * W <= C) {
      const int64_t end = c + kBlock < C ? c + kBlock : C;
      V r0(A(0)), r1(A(0));
      auto step = [&](auto NC) {
        constexpr int N = decltype(NC)::value;  // vectors: 2 or 4
        V p[N];
        for (int j = 0; j < N; ++j) p[j] = vexp_fn(V::load(x + c + j * W) - lv);
        for (int j = 0; j < N; ++j) {
          const V o = p[j] * kpv;
          if (stream)
            o.stream(gx + c + j * W);
          else
            o.store(gx + c + j * W);
        }
        if (c <= y && y < c + N * W) {  // leave the target's own p out of the sum
          A b[N * W];
          for (int j = 0; j < N; ++j) p[j].store(b + j * W);
          b[y - c] = A(0);
          for (int j = 0; j < N; ++j) p[j] = V::load(b + j * W);
        }
        for (int j = 0; j < N; j += 2) {
          r0 = r0 + p[j];
          r1 = r1 + p[j + 1];
        }
        c += N * W;
      };
      while (c + 4 * W <= end) step(std::integral_constant<int, 4>{});
      if (c + 2 * W <= end) step(std::integral_constant<int, 2>{});
      rest += double(hsum(r0 + r1));
    }
    for (; c < C; ++c) {
      const A p = sexp(to_acc<A>(x[c]) - lse);
      if (c != y) rest += double(p);
      put(gx + c, p * kp);
    }
  });
  if (stream) store_fence();  // order the streamed row before the target element's store
  const A dy = to_acc<A>(x[y]) - lse;
  const A py = sexp(dy);
  const A py_minus_1 = py > A(0.5) ? -A(rest) : sexpm1(dy);
  put(gx + y, kp * py_minus_1);
}

// Forward; with a.gx (the fused path) also the gradient for a per-row upstream gradient a.grad_scale,
// written while the row is still in cache.
template <class T, class A>
int sf_fwd_rows(const SoftmaxFocalArgs& a) {
  const T* X = static_cast<const T*>(a.x);
  T* GX = static_cast<T*>(a.gx);
  const A* scale = static_cast<const A*>(a.scale);
  A* loss_out = static_cast<A*>(a.loss);
  A* lse_out = static_cast<A*>(a.lse);
  A* d_out = static_cast<A*>(a.dscale);
  const int64_t C = a.C, S = a.S, R = a.N * a.S;
  const A gs = A(a.grad_scale);
  int bad = 0;
  const int64_t grain = dynamic_grain(C);
#pragma omp parallel num_threads(a.nthreads) if (a.nthreads > 1)
  {
  // fused_row's scratch row, one per thread, allocated per call (a thread_local in a shared library
  // costs a __tls_get_addr call per use, which GCC does not hoist out of loops).
  const bool one_exp = std::is_same_v<T, float> && GX && C <= kFusedMaxClasses;
  std::unique_ptr<A[]> scratch(one_exp ? new A[C + Vec<A>::W] : nullptr);
#pragma omp for schedule(dynamic, grain)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = r / S, s = r - n * S;
    const T* x = X + n * a.x_sN + s * a.x_sS;
    const int64_t y = a.y[n * a.y_sN + s * a.y_sS];
    const bool live = y != a.ignore_index && y >= 0 && y < C;
    A loss = 0, dscale = 0;
    // float32 only: float64 keeps one formula for the fused and the unfused gradient, bit for bit
    // (gradcheck runs a retained graph's backward twice and asks for the same bits).
    if (one_exp && live) {
      T* gx = GX + n * a.gx_sN + s * a.gx_sS;
      const T* next = r + 1 < R ? X + (r + 1) / S * a.x_sN + (r + 1) % S * a.x_sS : nullptr;
      A m;
      double logsum_d, rest, top;
      const bool done = fused_row<T, A>(x, gx, scratch.get(), C, a.stream, next, &m, &logsum_d, &rest, &top,
                                        [&](A mm, double ls) {
        const A nl = (mm - to_acc<A>(x[y])) + A(ls);
        focal_row<A>(class_factor<A>(a, scale, y), nl, a.gamma, &loss, &dscale);
        return gs * dscale;
      });
      if (done) {
        put(gx + y, gs * dscale * fused_py_minus_1<A>(to_acc<A>(x[y]), m, logsum_d, rest, top));
        lse_out[r] = m + A(logsum_d);
        loss_out[r] = loss;
        d_out[r] = dscale;
        continue;
      }
      loss = dscale = 0;
    }
    A m;
    double logsum_d, unused;
    row_stats_index<T, A>(NoTerms{}, x, nullptr, C, SoftCapOf<A, NoTerms>({}, 0.0), &m, &logsum_d, &unused);
    const A logsum = A(logsum_d);
    const A lse = m + logsum;
    lse_out[r] = lse;
    if (live) {
      // (m - x_y) + log(sum) rather than lse - x_y: exact when the target holds the max logit.
      const A nl = (m - to_acc<A>(x[y])) + logsum;
      focal_row<A>(class_factor<A>(a, scale, y), nl, a.gamma, &loss, &dscale);
    } else if (y != a.ignore_index) {
      flag_bad(&bad);
    }
    loss_out[r] = loss;
    d_out[r] = dscale;
    if (GX) {
      T* gx = GX + n * a.gx_sN + s * a.gx_sS;
      if (live)
        grad_row<T, A>(x, gx, C, y, gs * dscale, lse, a.stream);
      else
        zero_row<T, A>(gx, C);
    }
  }
  }
  return bad;
}

template <class T, class A>
int sf_bwd_rows(const SoftmaxFocalArgs& a) {
  const T* X = static_cast<const T*>(a.x);
  T* GX = static_cast<T*>(a.gx);
  const A* G = static_cast<const A*>(a.g);
  const A* LSE = static_cast<const A*>(a.lse_in);
  const A* D = static_cast<const A*>(a.dscale_in);
  const int64_t C = a.C, S = a.S, R = a.N * a.S;
  int bad = 0;
  const int64_t grain = dynamic_grain(C);
#pragma omp parallel for num_threads(a.nthreads) if (a.nthreads > 1) schedule(dynamic, grain)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = r / S, s = r - n * S;
    const T* x = X + n * a.x_sN + s * a.x_sS;
    T* gx = GX + n * a.gx_sN + s * a.gx_sS;
    const int64_t y = a.y[n * a.y_sN + s * a.y_sS];
    if (y == a.ignore_index || y < 0 || y >= C) {
      if (y != a.ignore_index) flag_bad(&bad);
      zero_row<T, A>(gx, C);
      continue;
    }
    grad_row<T, A>(x, gx, C, y, G[n * a.g_sN + s * a.g_sS] * D[r], LSE[r], a.stream);
  }
  return bad;
}

// ---- Tile walk (spatial stride 1) ----------------------------------------------------------------

// A tile's targets (walk.h), each with its class factor K as fy.
template <class T, class A>
inline void focal_tile_targets(const SoftmaxFocalArgs& a, const Tile<A>& tl, const T* x, TileTargets<A>& tt, int* bad) {
  const A* scale = static_cast<const A*>(a.scale);
  tile_targets<T, A>(a, tl, x, tt, bad, [&](int64_t y) { return class_factor<A>(a, scale, y); });
}

// The gradient of one tile, per lane kp[j] (g D) and lse[j]: the cross-entropy's tile pass (walk.h)
// with no optional term; rows not live get exact zeros.
template <class T, class A>
inline void grad_tile(const SoftmaxFocalArgs& a, const Tile<A>& tl, const T* x, T* gx,
                      const TileTargets<A>& tt, const A* kp, const A* lse) {
  using V = Vec<A>;
  constexpr int W = V::W, L = Tile<A>::L;
  alignas(32) A gy[L] = {}, yf[L];
  for (int j = 0; j < L; ++j) yf[j] = tt.live[j] ? A(tt.y[j]) : A(-1);
  TileGrad<A> tg;
  for (int u = 0; u < kU; ++u) {
    tg.kp[u] = V::load(kp + u * W);
    tg.y[u] = V::load(yf + u * W);
    tg.hi[u] = V::load(lse + u * W);
    tg.lo[u] = tg.kw[u] = V(A(0));  // an lse of one float; (x - lse) - 0 is x - lse exactly
    tg.on[u] = tl.kv(u) ? V::mask(tt.live + u * W) : mask_none(V());
  }
  const SoftCapOf<A, NoTerms> no_cap({}, 0.0);
  double rest[L] = {};
  with_exact_redo<V>([&](auto&& vexp_fn) {
    tile_grad_pass<T, A>(NoTerms{}, no_cap, x, gx, a.C, a.x_sC, a.gx_sC, tl, tg, static_cast<const A*>(nullptr), rest,
                         vexp_fn);
  });
  for (int u = 0; u < kU; ++u) {
    if (!tl.kv(u)) continue;
    V py, py_minus_1;
    tile_target_p(V::load(tt.xy + u * W), tg.hi[u], tg.lo[u], rest + u * W, &py, &py_minus_1);
    (tg.kp[u] * py_minus_1).store(gy + u * W);
  }
  for (int j = 0; j < tl.k; ++j)
    if (tt.live[j]) put(gx + tt.y[j] * a.gx_sC + j, gy[j]);
}

// The tile walk of softmax focal's calls (walk_tiles, walk.h): body(b, tile, &bad) per tile.
template <class T, class A, class Body>
int sf_walk_tiles(const SoftmaxFocalArgs& a, bool gathered, Body&& body) {
  return walk_tiles<T, T, A>(
      a, gathered, false, dynamic_grain(a.C * Tile<A>::L),
      [](SoftmaxFocalArgs& b, int64_t r0) {  // a gathered tile's per-row outputs and statistics start at row r0
        auto at = [r0](void* p) { return p ? static_cast<void*>(static_cast<A*>(p) + r0) : nullptr; };
        auto at_in = [r0](const void* p) { return p ? static_cast<const void*>(static_cast<const A*>(p) + r0) : nullptr; };
        b.loss = at(b.loss);
        b.lse = at(b.lse);
        b.dscale = at(b.dscale);
        b.lse_in = at_in(b.lse_in);
        b.dscale_in = at_in(b.dscale_in);
      },
      [&](const SoftmaxFocalArgs& b, const Tile<A>& tl, int* bad, A*) { body(b, tl, bad); });
}

// One tile's losses, lses and focal factors, and with a.gx its gradient for a.grad_scale.
template <class T, class A>
inline void sf_fwd_tile(const SoftmaxFocalArgs& a, const Tile<A>& tl, int* bad) {
  using V = Vec<A>;
  constexpr int W = V::W, L = Tile<A>::L;
  A* loss_out = static_cast<A*>(a.loss);
  A* lse_out = static_cast<A*>(a.lse);
  A* d_out = static_cast<A*>(a.dscale);
  const int64_t C = a.C, S = a.S;
  const A gs = A(a.grad_scale);
  const T* x = static_cast<const T*>(a.x) + tl.n * a.x_sN + tl.s0;
  V m[kU];
  double sum[L] = {}, top[L] = {};
  tile_stats<T, A>(NoTerms{}, x, C, a.x_sC, tl, SoftCapOf<A, NoTerms>({}, 0.0), static_cast<const A*>(nullptr), m, sum,
                   top, static_cast<double*>(nullptr));
  TileTargets<A> tt;
  focal_tile_targets<T, A>(a, tl, x, tt, bad);
  alignas(32) A nl[L] = {}, lse[L] = {}, loss[L] = {}, dscale[L] = {}, kp[L] = {};
  for (int u = 0; u < kU; ++u) {
    if (!tl.kv(u)) continue;
    const V logsum = log_sum(unfold<A>(sum + u * W), unfold<A>(top + u * W));
    (m[u] + logsum).store(lse + u * W);
    // (m - x_y) + log(sum), as the row walk.
    ((m[u] - V::load(tt.xy + u * W)) + logsum).store(nl + u * W);
  }
  for (int j = 0; j < tl.k; ++j)
    if (tt.live[j]) {
      focal_row<A>(tt.fy[j], nl[j], a.gamma, loss + j, dscale + j);
      kp[j] = gs * dscale[j];
    }
  for (int u = 0; u < kU; ++u) {
    const int kv = tl.kv(u);
    if (!kv) continue;
    const int64_t r0 = tl.n * S + tl.s0 + u * W;
    store_k(V::load(lse + u * W), lse_out + r0, kv);
    store_k(V::load(loss + u * W), loss_out + r0, kv);
    store_k(V::load(dscale + u * W), d_out + r0, kv);
  }
  if (a.gx) grad_tile<T, A>(a, tl, x, static_cast<T*>(a.gx) + tl.n * a.gx_sN + tl.s0, tt, kp, lse);
}

// One tile's gradient from the saved lses and focal factors.
template <class T, class A>
inline void sf_bwd_tile(const SoftmaxFocalArgs& a, const Tile<A>& tl, int* bad) {
  constexpr int L = Tile<A>::L;
  const A* G = static_cast<const A*>(a.g);
  const A* LSE = static_cast<const A*>(a.lse_in);
  const A* D = static_cast<const A*>(a.dscale_in);
  const T* x = static_cast<const T*>(a.x) + tl.n * a.x_sN + tl.s0;
  TileTargets<A> tt;
  focal_tile_targets<T, A>(a, tl, x, tt, bad);
  alignas(32) A kp[L] = {}, lse[L] = {};
  for (int j = 0; j < tl.k; ++j) {
    const int64_t r = tl.n * a.S + tl.s0 + j;
    lse[j] = LSE[r];
    if (tt.live[j]) kp[j] = G[tl.n * a.g_sN + (tl.s0 + j) * a.g_sS] * D[r];
  }
  grad_tile<T, A>(a, tl, x, static_cast<T*>(a.gx) + tl.n * a.gx_sN + tl.s0, tt, kp, lse);
}

inline bool sf_walk_rows(const SoftmaxFocalArgs& a) { return a.C == 1 || a.x_sC == 1; }

// Class stride 1 walks rows, short ones gathered into tiles (walk.h, kShortRowMaxClasses); spatial
// stride 1 walks tiles.
template <class T, class A>
int sf_forward_t(const SoftmaxFocalArgs& a) {
  const bool gathered = sf_walk_rows(a) && gathers_short_rows(a);
  if (sf_walk_rows(a) && !gathered) return sf_fwd_rows<T, A>(a);
  return sf_walk_tiles<T, A>(a, gathered, [](auto&&... args) { sf_fwd_tile<T, A>(args...); });
}

template <class T, class A>
int sf_backward_t(const SoftmaxFocalArgs& a) {
  const bool gathered = sf_walk_rows(a) && gathers_short_rows(a);
  if (sf_walk_rows(a) && !gathered) return sf_bwd_rows<T, A>(a);
  return sf_walk_tiles<T, A>(a, gathered, [](auto&&... args) { sf_bwd_tile<T, A>(args...); });
}

inline int softmax_forward(const SoftmaxFocalArgs& a) {
  return with_dtype(a.dtype, [&](auto t, auto acc) { return sf_forward_t<decltype(t), decltype(acc)>(a); });
}

inline int softmax_backward(const SoftmaxFocalArgs& a) {
  return with_dtype(a.dtype, [&](auto t, auto acc) { return sf_backward_t<decltype(t), decltype(acc)>(a); });
}

#undef LF_FOCAL_INLINE

}  // namespace focal
