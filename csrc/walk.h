// The row and tile walks shared by the softmax-family CPU kernels (cross-entropy, softmax focal; the
// distillation rows use the row half): the online log-sum-exp of a row, the tile of neighbouring rows,
// and small load/store helpers. Pasted into
// each instruction-set namespace by the kernel headers that include it, like vec.h (no include guard, no
// system #include: see isa_instantiate.h); a translation unit includes at most one such kernel header.
// Nothing here knows a loss's arguments, but for the class-index target fields that every
// softmax-family loss names alike (tile_targets).
//
// Logits are (N, C, S) with arbitrary strides; row r = n * S + s. Two walk orders:
//   rows:  class stride 1 ((N, C), channels-last) -- vectorised along the classes of one row;
//   tiles: spatial stride 1 ((N, C, H, W))        -- vectorised across 2 x W neighbouring rows, so
//          the usual segmentation layout is read in place instead of through a transposed copy.
// Every sum is in fp32 lanes (fp64 for double) folded into a double every kBlock elements, so a
// 256k-class row keeps the rounding error of a 4k-class one.

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

// The optional terms of a softmax-family kernel: class weights, label smoothing's sums, logit
// soft-capping. Each member is either std::false_type -- the term is compiled out -- or a bool read at
// run time. The common call, no option at all, runs kernels built with NoTerms; every other runs one
// set built with AnyTerms. Their tests are per vector or per row, on values that never change within a
// call (perfectly predicted branches), against the exp and the memory traffic of the same vector.
// A compile-time flag per option (2^3 instantiations of every kernel, per dtype and instruction set)
// made most of the extension's build time for a speed no benchmark could tell apart.
template <class HW, class SM, class CP>
struct Terms {
  HW has_w;   // class weights
  SM smooth;  // label smoothing (eps > 0)
  CP cap;     // logit soft-capping
};
using NoTerms = Terms<std::false_type, std::false_type, std::false_type>;
using AnyTerms = Terms<bool, bool, bool>;

// f(NoTerms{}) when no term is on, else f(AnyTerms{...}): the one place the options become types.
template <class F>
inline int with_terms(bool has_w, bool smooth, bool cap, F&& f) {
  if (!has_w && !smooth && !cap) return f(NoTerms{});
  return f(AnyTerms{has_w, smooth, cap});
}

// Logit soft-capping x -> cap * tanh(x / cap), and its derivative 1 - tanh^2, when `on` (a Terms::cap).
template <class A, class On>
struct SoftCap {
  using V = Vec<A>;
  On on;
  A cap, inv;
  SoftCap(On o, double c) : on(o), cap(A(c)), inv(o ? A(1) / A(c) : A(0)) {}
  V operator()(V x) const { return on ? V(cap) * vtanh(x * V(inv)) : x; }
  A operator()(A x) const { return on ? cap * stanh(x * inv) : x; }
  // x' and d x'/d x (1 when off, where callers do not multiply by it: set only so that no compiler
  // sees an uninitialised read in the run-time-flag kernels)
  void with_slope(V x, V& xc, V& slope) const {
    if (on) {
      const V t = vtanh(x * V(inv));
      xc = V(cap) * t;
      slope = fnmadd(t, t, V(A(1)));
    } else {
      xc = x;
      slope = V(A(1));
    }
  }
  A slope(A x) const {
    if (!on) return A(1);
    const A t = stanh(x * inv);
    return A(1) - t * t;
  }
};
template <class A, class O>
using SoftCapOf = SoftCap<A, decltype(O::cap)>;

// Runs `pass(exp_fn)` with the fast exp, and again with the exact one if some lane underflowed below
// the normal range -- rare (logits spread by more than 87), and then those outputs must hold the
// true subnormal or zero values.
template <class V, class Pass>
inline void with_exact_redo(Pass&& pass) {
  auto oob = mask_none(V());
  pass([&](V e) { return vexp_normal(e, oob); });
  if (mask_any(oob)) pass([](V e) { return vexp(e); });
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

// A gradient row of exact zeros (an ignored target).
template <class T, class A>
inline void zero_row(T* gx, int64_t C) {
  using V = Vec<A>;
  const V z(A(0));
  int64_t c = 0;
  for (; c + V::W <= C; c += V::W) z.store(gx + c);
  for (; c < C; ++c) put(gx + c, A(0));
}

// Softmax denominators are kept as (rest, top): top counts the terms at the row max (x = m, whose
// exp is exactly 1) and rest sums the others. A confident row's log-sum is then
// log1p(rest + (top - 1)) = log1p(rest), exact to its last bit, where 1 + rest summed in fp32 lanes
// would keep only the rounding of the 1: its tiny loss (say 1e-6) would come out with a relative
// error of 10% -- as in torch's fp32 kernels, but not here.
template <class V>
inline void add_exp_term(V e, V& rest, V& top) {
  const auto at_max = cmp_eq(e, V(0));
  rest = rest + zero_where(at_max, vexp_sum_term(e));
  top = count_add(top, at_max);  // an integer count in the lanes' bits: read with count_value
}
// The same for the lanes `on` only (a partial vector; the others may hold anything, even e = 0).
template <class V>
inline void add_exp_term(V e, V& rest, V& top, typename V::Mask on) {
  const auto at_max = mask_and(on, cmp_eq(e, V(0)));
  rest = rest + zero_where(at_max, select(on, vexp_sum_term(e), V(0)));
  top = count_add(top, at_max);
}
// log(top + rest) as above: no top (a row of -inf: rest = 0 too) gives log1p(-1) = -inf, as log(0).
inline double log_sum(double rest, double top) { return std::log1p(rest + (top - 1.0)); }
template <class V>
inline V log_sum(V rest, V top) {
  return vlog1p(rest + (top - V(1)));
}

// Sums over one block relative to the (capped) max m: exp(x' - m) as (rest, top) and, with smoothing,
// w_c (x'_c - m) and w_c.
template <class T, class A, class O>
inline void block_sums_index(O opt, const T* x, const A* w, int64_t n, A m, const SoftCapOf<A, O>& cap, double* sum,
                             double* top, double* d, double* ws) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const V mv(m);
  V s0(A(0)), s1(A(0)), s2(A(0)), s3(A(0)), t0(A(0)), d0(A(0)), d1(A(0)), w0(A(0));
  int64_t c = 0;
  for (; c + 4 * W <= n; c += 4 * W) {
    // Pull the next block towards L2 while this one is summed from L1: the memory reads and the exp
    // arithmetic then overlap instead of taking turns (x + kBlock past the row end is the next row).
    __builtin_prefetch(x + c + kBlock, 0, 2);
    __builtin_prefetch(reinterpret_cast<const char*>(x + c + kBlock) + 64, 0, 2);
    const V e0 = cap(V::load(x + c)) - mv, e1 = cap(V::load(x + c + W)) - mv;
    const V e2 = cap(V::load(x + c + 2 * W)) - mv, e3 = cap(V::load(x + c + 3 * W)) - mv;
    add_exp_term(e0, s0, t0);
    add_exp_term(e1, s1, t0);
    add_exp_term(e2, s2, t0);
    add_exp_term(e3, s3, t0);
    if (opt.smooth) {
      if (opt.has_w) {
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
    add_exp_term(e, s0, t0, on);
    if (opt.smooth) {
      const V wv = opt.has_w ? load_k(w + c, k, A(0)) : V(A(1));
      d0 = d0 + select(on, wv * e, V(A(0)));
      if (opt.has_w) w0 = w0 + select(on, wv, V(A(0)));
    }
  }
  double sd = double(hsum((s0 + s1) + (s2 + s3))), dd = double(hsum(d0 + d1));
  double wd = opt.has_w ? double(hsum(w0)) : double(n);
  *sum += sd;
  *top += double(hsum(count_value(t0)));
  *d += dd;
  *ws += wd;
}

// The online softmax walk of a row, kBlock classes at a time: each block is read from memory once for
// its max and again from L1 for its sums, which are rescaled whenever the running max grows. The loss
// supplies block_max_of(c0, n), the max of classes [c0, c0 + n) as its terms see the logits (capped,
// scaled), and sums(c0, n, m), which adds their terms relative to m: the softmax denominator's into
// (sum, top), the loss's own into its accumulators. shift(m_old - m_new) moves those to a larger max,
// reset() zeroes them. Returns the max the sums are relative to. A block that is all -inf (masked
// vocabulary) would make x - m undefined while m is still -inf, so such rows take the plain two passes;
// a row of only -inf gets no sums at all (its lse is then -inf, as torch.logsumexp's).
template <class A, class BlockMaxOf, class Sums, class Shift, class Reset>
inline A online_row_walk(int64_t C, double& sum, double& top, BlockMaxOf&& block_max_of, Sums&& sums, Shift&& shift,
                         Reset&& reset) {
  const A ninf = -std::numeric_limits<A>::infinity();
  A m = ninf;
  bool online = true;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t n = C - c0 < kBlock ? C - c0 : kBlock;
    const A bm = block_max_of(c0, n);
    if (bm == ninf) {
      online = false;
      break;
    }
    if (bm > m) {
      if (m != ninf) {
        // The old max's terms join the rest: e^(m - bm) < 1 now.
        sum = (sum + top) * std::exp(double(m) - double(bm));
        top = 0;
        shift(double(m) - double(bm));
      }
      m = bm;
    }
    sums(c0, n, m);
  }
  if (!online) {
    m = block_max_of(0, C);
    sum = top = 0;
    reset();
    for (int64_t c0 = 0; c0 < C && m != ninf; c0 += kBlock) sums(c0, C - c0 < kBlock ? C - c0 : kBlock, m);
  }
  return m;
}

// log-sum-exp statistics of one row in a single pass over memory (online_row_walk): the (capped) max
// m, log sum_c exp(x'_c - m) and, with smoothing, sum_c w_c (x'_c - m). tanh is increasing, so the
// capped max is the cap of the raw max.
template <class T, class A, class O>
inline void row_stats_index(O opt, const T* x, const A* w, int64_t C, const SoftCapOf<A, O>& cap, A* m_out,
                            double* logsum_out, double* d_out) {
  double sum = 0, top = 0, d = 0, ws = 0;
  *m_out = online_row_walk<A>(
      C, sum, top, [&](int64_t c0, int64_t n) { return cap(block_max<T, A>(x + c0, n)); },
      [&](int64_t c0, int64_t n, A m) {
        block_sums_index<T, A>(opt, x + c0, opt.has_w ? w + c0 : w, n, m, cap, &sum, &top, &d, &ws);
      },
      [&](double dm) {
        if (opt.smooth) d += dm * ws;
      },
      [&] { d = ws = 0; });
  *logsum_out = log_sum(sum, top);
  *d_out = d;
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

template <class T, class A, class On>
inline void tile_max(const T* x, int64_t C, int64_t sC, const Tile<A>& tl, const SoftCap<A, On>& cap,
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

// A tile's max (tile_max), then per lane the sums of exp(x' - m) as (rest, top) and, with smoothing,
// of w_c (x'_c - m): the class-index forward of every softmax-family loss, as row_stats_index for a row.
//
// With `buf` (C x L elements, class-major), the exps are also kept there for the gradient pass of the
// fused walk (fused_grad_tile, cross_entropy_kernel.h): computed with vexp_normal, whose out-of-range lanes are flagged in
// *oob -- the caller then redoes the tile the two-exp way. In the normal range vexp_normal is
// vexp_sum_term, so the sums are the same bits either way.
template <class T, class A, class O>
inline void tile_stats(O opt, const T* x, int64_t C, int64_t sC, const Tile<A>& tl, const SoftCapOf<A, O>& cap,
                       const A* w, Vec<A>* m, double* sum, double* top, double* dsum, A* buf = nullptr,
                       typename Vec<A>::Mask* oob = nullptr) {
  using V = Vec<A>;
  constexpr int W = V::W;
  tile_max<T, A>(x, C, sC, tl, cap, m);
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t c1 = c0 + kBlock < C ? c0 + kBlock : C;
    V sv[kU], tv[kU], dv[kU];
    for (int u = 0; u < kU; ++u) sv[u] = tv[u] = dv[u] = V(A(0));
    for (int64_t c = c0; c < c1; ++c) {
      for (int u = 0; u < kU; ++u) {
        if (!tl.kv(u)) continue;
        const V e = cap(load_k(x + c * sC + u * W, tl.kv(u), A(0))) - m[u];
        if (buf) {
          const V p = vexp_normal(e, *oob);
          p.store(buf + c * Tile<A>::L + u * W);
          const auto at_max = cmp_eq(e, V(A(0)));
          sv[u] = sv[u] + zero_where(at_max, p);
          tv[u] = count_add(tv[u], at_max);
        } else {
          add_exp_term(e, sv[u], tv[u]);
        }
        if (opt.smooth) dv[u] = opt.has_w ? fmadd(V(w[c]), e, dv[u]) : dv[u] + e;
      }
    }
    for (int u = 0; u < kU; ++u) {
      fold(sv[u], sum + u * W);
      fold(count_value(tv[u]), top + u * W);
      if (opt.smooth) fold(dv[u], dsum + u * W);
    }
  }
}

// Per lane of a tile, its row's class-index target: the class y, its raw logit, the loss's factor for
// that class (fy: the class weight, or focal's alpha_y w_y) and whether the row counts.
template <class A>
struct TileTargets {
  static constexpr int L = Tile<A>::L;
  alignas(32) A xy[L] = {}, fy[L] = {};
  int64_t y[L] = {};
  bool live[L] = {};
};

// Reads them for tile tl, whose logits start at x; factor_of(y) gives fy. A target that is
// ignore_index does not count, one outside [0, C) flags *bad and does not count either. Args: any
// softmax-family loss's arguments, with the (N, C, S) fields y, y_sN, y_sS, ignore_index, C and x_sC.
template <class T, class A, class Args, class FactorOf>
inline void tile_targets(const Args& a, const Tile<A>& tl, const T* x, TileTargets<A>& tt, int* bad,
                         FactorOf&& factor_of) {
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
    tt.fy[j] = factor_of(y);
  }
}

// Per-lane state of a tile's class-index gradient pass: the lane's lse = hi + lo, the factor kp of
// p_c and, with smoothing, kw of w_c (d loss / d x'_c = p_c kp - kw w_c off the target), the lanes
// whose rows count (`on`; the others get exact zeros, whatever their logits hold) and their targets
// as floats (exact below 2^24 classes; -1 for rows that do not count).
template <class A>
struct TileGrad {
  Vec<A> hi[kU], lo[kU], kp[kU], kw[kU], y[kU];
  typename Vec<A>::Mask on[kU];
};

// The gradient pass of a tile: every element but the targets', and per lane sum_{c != y} p_c into
// `rest` (zeroed here) for the target element, which the caller writes (p_y - 1 formed as -rest where
// p_y > 1/2: see the row backward). prob(c, u, kv, slope) gives p_c of the kv live lanes of vector u
// and, where opt.cap, d x'/d x in slope; ahead(c) prefetches what prob reads later.
template <class T, class A, class O, class Ahead, class Prob>
inline void tile_grad_walk(O opt, T* gx, int64_t C, int64_t gsC, const Tile<A>& tl, const TileGrad<A>& tg, const A* w,
                           double* rest, Ahead&& ahead, Prob&& prob) {
  using V = Vec<A>;
  constexpr int W = V::W;
  for (int j = 0; j < Tile<A>::L; ++j) rest[j] = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t c1 = c0 + kBlock < C ? c0 + kBlock : C;
    V r[kU];
    for (int u = 0; u < kU; ++u) r[u] = V(A(0));
    for (int64_t c = c0; c < c1; ++c) {
      ahead(c);
      prefetch_tile_ahead<T, A>(gx, c, gsC, true);
      const V cv{A(c)};
      for (int u = 0; u < kU; ++u) {
        const int kv = tl.kv(u);
        if (!kv) continue;
        V slope;
        const V p = prob(c, u, kv, slope);
        V o = p * tg.kp[u];
        if (opt.smooth) o = opt.has_w ? fnmadd(tg.kw[u], V(w[c]), o) : o - tg.kw[u];
        if (opt.cap) o = o * slope;
        store_k(select(tg.on[u], o, V(A(0))), gx + c * gsC + u * W, kv);
        r[u] = r[u] + select(cmp_eq(tg.y[u], cv), V(A(0)), p);
      }
    }
    for (int u = 0; u < kU; ++u) fold(r[u], rest + u * W);
  }
}

// tile_grad_walk with p_c = exp(x'_c - lse) from the logits, exp_fn as with_exact_redo hands it.
template <class T, class A, class O, class ExpFn>
inline void tile_grad_pass(O opt, const SoftCapOf<A, O>& cap, const T* x, T* gx, int64_t C, int64_t sC, int64_t gsC,
                           const Tile<A>& tl, const TileGrad<A>& tg, const A* w, double* rest, ExpFn&& vexp_fn) {
  using V = Vec<A>;
  tile_grad_walk<T, A>(
      opt, gx, C, gsC, tl, tg, w, rest, [&](int64_t c) { prefetch_tile_ahead<T, A>(x, c, sC); },
      [&](int64_t c, int u, int kv, V& slope) {
        V xc;
        cap.with_slope(load_k(x + c * sC + u * V::W, kv, A(0)), xc, slope);
        return vexp_fn((xc - tg.hi[u]) - tg.lo[u]);
      });
}

// p_y and p_y - 1 of a tile's lanes from the (capped) target logits: -rest where p_y > 1/2, else
// expm1, each where it is better conditioned (see the row backward).
template <class A>
inline void tile_target_p(Vec<A> xy, Vec<A> hi, Vec<A> lo, const double* rest, Vec<A>* py, Vec<A>* py_minus_1) {
  using V = Vec<A>;
  const V dy = (xy - hi) - lo;
  *py = vexp(dy);
  *py_minus_1 = select(cmp_lt(V(A(0.5)), *py), vneg(unfold<A>(rest)), vexpm1(dy));
}

// ------------------------------------------------------------------------------------------------
// Short rows gathered into tiles.
// ------------------------------------------------------------------------------------------------

// Short rows (class stride 1, at most kShortRowMaxClasses classes: (N, 10) classification, channels-last
// segmentation) in the row walk pay per row for a horizontal max and sum and for a log and an expm1 in
// scalar code -- several times the row's own exps (10 classes: about 90 ns a row forward and 155 with
// the gradient, on the project's 2-core machine). They go through the tile bodies instead: each tile's L
// rows are copied, transposed, into a per-thread C x L buffer (L1), the tile body runs on it exactly as
// on the spatial layout -- the per-row math becomes vector math across rows -- and the gradient tile is
// copied back to the rows. No N x C copy is made. From about 48 classes the row walk's per-row cost is
// spread over enough classes that the two copies no longer pay (docs/design.md, "Layouts").
constexpr int64_t kShortRowMaxClasses = 32;

template <class Args>
inline bool gathers_short_rows(const Args& a) {
  return a.x_sC == 1 && a.C > 1 && a.C <= kShortRowMaxClasses;
}

// The elements of a softmax-family call as threads_for (common.h) weighs them: gathered short rows cost
// several times a long row's per element with their gradient (the per-row work is spread over few
// classes) and count twice.
template <class Args>
inline int64_t thread_work(const Args& a) {
  return a.N * a.C * a.S * (gathers_short_rows(a) ? 2 : 1);
}

// Runs body(b, tile, &bad, buf) over every tile of a softmax-family call; returns bad. `buf`: a
// per-thread C x L scratch of the accumulation type when want_buf (a fused walk's kept exps), else null.
//
// Not gathered: b is `call` and the tiles are tile_at's (spatial stride 1), `chunk` tiles per scheduled
// chunk. Gathered (gathers_short_rows): each tile's logits -- and a probability target of storage type
// TT, for Args with one (`t`, `gt`) -- are copied into per-thread buffers; `b` describes the buffers
// with the tile at their row 0, its class-index targets and upstream gradient start at the tile's first
// row, rebase(b, r0) moves the loss's per-row outputs and saved statistics there too, and the gradient
// tiles (gx, and gt) are copied to the call's afterwards. Args: the loss's (N, C, S) fields x, y, g,
// gx with their strides, nthreads.
template <class T, class TT, class A, class Args, class Rebase, class Body>
int walk_tiles(const Args& call, bool gathered, bool want_buf, int64_t chunk, Rebase&& rebase, Body&& body) {
  constexpr int L = Tile<A>::L;
  constexpr bool kProb = requires { call.t; };
  Args a = call;
  if (gathered && a.S == 1) {  // (N, C) rows: walk the n as the positions of a single n
    a.S = a.N;
    a.N = 1;
    a.x_sS = a.x_sN;
    a.y_sS = a.y_sN;
    a.g_sS = a.g_sN;
    a.gx_sS = a.gx_sN;
    a.x_sN = a.y_sN = a.g_sN = a.gx_sN = 0;
    if constexpr (kProb) {
      a.t_sS = a.t_sN;
      a.gt_sS = a.gt_sN;
      a.t_sN = a.gt_sN = 0;
    }
  }
  const int64_t C = a.C, per_n = (a.S + L - 1) / L, tiles = a.N * per_n;
  if (gathered) chunk = std::max<int64_t>(1, tiles / (int64_t(a.nthreads) * 8));
  bool has_t = false, has_gt = false;
  if constexpr (kProb) {
    has_t = a.t != nullptr;
    has_gt = a.gt != nullptr;
  }
  int bad = 0;
#pragma omp parallel num_threads(a.nthreads) if (a.nthreads > 1)
  {
  auto scratch = [&](bool want, auto type) {
    using E = decltype(type);
    return std::unique_ptr<E[]>(want ? new E[C * L] : nullptr);
  };
  auto buf = scratch(want_buf, A{});
  auto xt = scratch(gathered, T{});
  auto tt = scratch(gathered && has_t, TT{});
  auto gxt = scratch(gathered && a.gx, T{});
  auto gtt = scratch(gathered && has_gt, TT{});
  // A tile's rows (strides sN, sC, sS) to a class-major C x L buffer, and back.
  auto gather = [&](const auto* src, int64_t sN, int64_t sC, int64_t sS, const Tile<A>& tl, auto* dst) {
    src += tl.n * sN + tl.s0 * sS;
    for (int j = 0; j < tl.k; ++j)
      for (int64_t c = 0; c < C; ++c) dst[c * L + j] = src[j * sS + c * sC];
  };
  auto scatter = [&](const auto* src, auto* dst, int64_t sN, int64_t sC, int64_t sS, const Tile<A>& tl) {
    dst += tl.n * sN + tl.s0 * sS;
    for (int j = 0; j < tl.k; ++j)
      for (int64_t c = 0; c < C; ++c) dst[j * sS + c * sC] = src[c * L + j];
  };
#pragma omp for schedule(dynamic, chunk)
  for (int64_t tix = 0; tix < tiles; ++tix) {
    const Tile<A> tl = tile_at<A>(tix, per_n, a.S);
    if (!gathered) {
      body(a, tl, &bad, buf.get());
      continue;
    }
    Args b = a;
    b.N = 1;
    b.S = L;
    gather(static_cast<const T*>(a.x), a.x_sN, a.x_sC, a.x_sS, tl, xt.get());
    b.x = xt.get();
    b.x_sN = b.gx_sN = 0;
    b.x_sC = b.gx_sC = L;
    b.x_sS = b.gx_sS = 1;
    if (a.y) b.y = a.y + tl.n * a.y_sN + tl.s0 * a.y_sS;
    if (a.g) b.g = static_cast<const A*>(a.g) + tl.n * a.g_sN + tl.s0 * a.g_sS;
    b.gx = gxt.get();
    if constexpr (kProb) {
      if (has_t) {
        gather(static_cast<const TT*>(a.t), a.t_sN, a.t_sC, a.t_sS, tl, tt.get());
        b.t = tt.get();
      }
      b.gt = gtt.get();
      b.t_sN = b.gt_sN = 0;
      b.t_sC = b.gt_sC = L;
      b.t_sS = b.gt_sS = 1;
    }
    if constexpr (requires { b.inplace; }) b.inplace = false;  // the logits are in xt: a redo reads them again
    rebase(b, tl.n * a.S + tl.s0);
    body(b, Tile<A>{0, 0, tl.k}, &bad, buf.get());
    if (a.gx) scatter(gxt.get(), static_cast<T*>(a.gx), a.gx_sN, a.gx_sC, a.gx_sS, tl);
    if constexpr (kProb)
      if (has_gt) scatter(gtt.get(), static_cast<TT*>(a.gt), a.gt_sN, a.gt_sC, a.gt_sS, tl);
  }
  }
  return bad;
}

// ------------------------------------------------------------------------------------------------
// The fused forward and gradient of one row (class stride 1), one exp per element.
// ------------------------------------------------------------------------------------------------

// Classes a fused row may have. Its exps sit in a per-thread scratch row (4 bytes a class) which,
// with the row itself, must stay in L2 between the passes (256 KiB + 256 KiB at the limit; Zen 3 has
// 512 KiB a core, recent Intel cores 1-2 MiB). Longer rows recompute their exps from the lse instead.
constexpr int64_t kFusedMaxClasses = 65536;

// A row's softmax statistics and its gradient with one exp per element instead of two (one for the
// sums, one again for the gradient): e_c = exp(x_c - m), m the row max, go into `buf` (C + W elements)
// while they are summed, and a second sweep writes gx_c = e_c * kp / S (S = sum_c e_c) with
// kp = kp_of(m, logsum), logsum = log S -- the gradient's factor, which may depend on the loss.
//
// The sums run in block_sums_index's order and with its exp (vexp_sum_term is vexp_normal in the
// normal range), folded into doubles every kBlock classes: a row of at most kBlock classes gets the
// bits of row_stats_index (its one block's max is the row max). A longer row is summed against the
// row max where row_stats_index uses a running one, which may round differently in the last bit.
//
// `next` (or null): the row this thread is likely to take next, pulled towards L2 while this one is
// in the exp pass, whose arithmetic would otherwise leave the memory bus idle.
//
// Returns false, having written nothing to gx, when m is not finite or some exp left the normal range
// (logits spread by more than 87): the caller's two-exp path, with its exact redo, takes the row.
// The target element is the caller's to write, from *rest_out / *top_out (fused_py_minus_1); the
// streamed stores are fenced before this returns, so that a plain store to gx[y] lands after them.
template <class T, class A, class KpOf>
inline bool fused_row(const T* x, T* gx, A* buf, int64_t C, bool stream, const T* next, A* m_out,
                      double* logsum_out, double* rest_out, double* top_out, KpOf&& kp_of) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const A m = block_max<T, A>(x, C);
  if (!(m > -std::numeric_limits<A>::infinity() && m < std::numeric_limits<A>::infinity())) return false;
  const V mv(m);
  auto oob = mask_none(V());
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  double rest = 0, top = 0;
  int64_t c = 0;
  for (int64_t c0 = 0; c0 < C; c0 = c) {
    const int64_t end = c0 + kBlock < C ? c0 + kBlock : C;
    V s0(A(0)), s1(A(0)), s2(A(0)), s3(A(0)), t0(A(0));
    for (; c + 4 * W <= end; c += 4 * W) {
      if (next)
        for (int64_t l = 0; l < 4 * W; l += kLine) __builtin_prefetch(next + c + l, 0, 2);
      const V e0 = V::load(x + c) - mv, e1 = V::load(x + c + W) - mv;
      const V e2 = V::load(x + c + 2 * W) - mv, e3 = V::load(x + c + 3 * W) - mv;
      const V p0 = vexp_normal(e0, oob), p1 = vexp_normal(e1, oob);
      const V p2 = vexp_normal(e2, oob), p3 = vexp_normal(e3, oob);
      p0.store(buf + c);
      p1.store(buf + c + W);
      p2.store(buf + c + 2 * W);
      p3.store(buf + c + 3 * W);
      const auto a0 = cmp_eq(e0, V(A(0))), a1 = cmp_eq(e1, V(A(0)));
      const auto a2 = cmp_eq(e2, V(A(0))), a3 = cmp_eq(e3, V(A(0)));
      s0 = s0 + zero_where(a0, p0);
      s1 = s1 + zero_where(a1, p1);
      s2 = s2 + zero_where(a2, p2);
      s3 = s3 + zero_where(a3, p3);
      t0 = count_add(count_add(count_add(count_add(t0, a0), a1), a2), a3);
    }
    for (; c < end; c += W) {  // single vectors, the last one partial (buf has room for a whole one)
      const int k = end - c < W ? int(end - c) : W;
      const typename V::Mask on = V::first(k);
      const V e = select(on, load_k(x + c, k, A(0)) - mv, V(A(-1)));  // off lanes: any normal exp
      const V p = vexp_normal(e, oob);
      p.store(buf + c);
      const auto at_max = mask_and(on, cmp_eq(e, V(A(0))));
      s0 = s0 + zero_where(at_max, select(on, p, V(A(0))));
      t0 = count_add(t0, at_max);
    }
    rest += double(hsum((s0 + s1) + (s2 + s3)));
    top += double(hsum(count_value(t0)));
  }
  if (mask_any(oob)) return false;
  const double logsum = log_sum(rest, top);
  *m_out = m;
  *logsum_out = logsum;
  *rest_out = rest;
  *top_out = top;
  const A f = A(double(kp_of(m, logsum)) / (rest + top));
  const V fv(f);
  c = 0;
  if (stream)  // peel to the alignment streaming stores need
    for (; c < C && (reinterpret_cast<uintptr_t>(gx + c) % (W * sizeof(T))) != 0; ++c) put(gx + c, buf[c] * f);
  for (; c + W <= C; c += W) {
    const V o = V::load(buf + c) * fv;
    if (stream)
      o.stream(gx + c);
    else
      o.store(gx + c);
  }
  for (; c < C; ++c) put(gx + c, buf[c] * f);
  if (stream) store_fence();  // order the streamed row before the caller's store of the target element
  return true;
}

// p_y - 1 of a row fused_row summed: -(S - 1) / S = -(rest + top - 1) / S when the target holds the
// max, exact from the sum of the other terms; otherwise p_y < 1/2 (another class has more) and expm1
// has no cancellation.
template <class A>
inline A fused_py_minus_1(A xy, A m, double logsum, double rest, double top) {
  return xy == m ? A(-(rest + (top - 1.0)) / (rest + top)) : sexpm1(A((double(xy) - double(m)) - logsum));
}
// p_y itself, to the same relative precision.
template <class A>
inline A fused_py(A xy, A m, double logsum, double rest, double top) {
  return xy == m ? A(1.0 / (rest + top)) : sexp(A((double(xy) - double(m)) - logsum));
}
