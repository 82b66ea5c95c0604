// Huber / SmoothL1 / L1 CPU kernels. Compiled once per instruction set by isa_instantiate.h (no include
// guard, no #include: see vec.h), in huber.cpp, which also defines HuberArgs. Everything sits in a nested
// namespace so that helper names cannot collide with another loss's kernels in the same ISA namespace.
//
// The operands (input x, target y, optional weight w, and in the backward of reduction='none' the
// upstream gradient g) all have the broadcast shape; any of them may be strided or expanded (stride 0).
// huber.cpp has already ordered and merged their dims into a small iteration space (innermost first),
// in which every output is dense: element i of the iteration order lives at out + i.
//
// The space is cut into blocks of `block` consecutive elements. A block is walked as runs along the
// innermost dim; a run whose operands all have stride 1 is handed to the vector loops as it is, any
// other operand is gathered (or, for stride 0, filled) into a small stack buffer first, so one set of
// vector loops serves every layout and the common contiguous case pays nothing for the others.
//
// Forward with a reduction writes no per-element output: each block's loss sum (fp32 lanes, folded
// into a double at the end of the block) goes to partials[block]; Python sums the partials in float64.
// The backward recomputes d = x - y from the inputs: it needs nothing saved but the inputs themselves.

namespace huber {

enum Mode { kHuber = 0, kSmoothL1 = 1, kL1 = 2 };

constexpr int kChunk = 256;  // elements gathered per strided piece (fits L1 for every operand)

// exact_inv: beta is a power of two whose reciprocal is representable, so x * (1 / beta) and x / beta
// are the same real number and round alike -- SmoothL1 then multiplies (a vector division costs several
// times a multiply, and the default beta = 1 is such a power).
template <class A>
struct Consts {
  Vec<A> delta, half, neg, inv;  // delta (beta), delta / 2, -delta, 1 / delta
  bool exact_inv;
  explicit Consts(double d)
      : delta(A(d)), half(A(0.5) * A(d)), neg(-A(d)), inv(A(1) / A(d)), exact_inv(is_exact_reciprocal(A(d))) {}
  static bool is_exact_reciprocal(A b) {
    int e;
    const A r = A(1) / b;
    return b > A(0) && std::isfinite(r) && std::frexp(b, &e) == A(0.5) && r * b == A(1);
  }
};

// The loss of one element, as torch writes it: z = |d|; z < delta ? 0.5 z^2 : delta (z - delta / 2)
// (Huber) and z < beta ? 0.5 z^2 / beta : z - beta / 2 (SmoothL1). A NaN d fails z < delta and
// lands in the linear branch, which keeps it NaN; d = +-inf gives inf.
template <int MODE, class A>
inline Vec<A> loss_of(Vec<A> d, const Consts<A>& k) {
  using V = Vec<A>;
  const V z = vabs(d);
  if (MODE == kL1) return z;
  const V q = (V(A(0.5)) * z) * z;
  if (MODE == kHuber) return select(cmp_lt(z, k.delta), q, k.delta * (z - k.half));
  // Divide rather than multiply by an inexact 1 / beta: one rounding, the same as torch's.
  return select(cmp_lt(z, k.delta), k.exact_inv ? q * k.inv : q / k.delta, z - k.half);
}

// d loss / d d. |d| >= delta takes the linear branch (at |d| = delta both branches give +-delta).
// The comparison is false for NaN, which therefore takes the quadratic branch and stays NaN, as in
// torch. L1 is sign(d) with 0 at d = 0 -- and at NaN, where torch's l1_loss gradient is sign(NaN) = 0.
template <int MODE, class A>
inline Vec<A> slope_of(Vec<A> d, const Consts<A>& k) {
  using V = Vec<A>;
  const V zero(A(0));
  if (MODE == kL1) return select(cmp_lt(zero, d), V(A(1)), select(cmp_lt(d, zero), V(A(-1)), zero));
  const auto linear = cmp_le(k.delta, vabs(d));
  if (MODE == kHuber) return select(linear, select(cmp_lt(d, zero), k.neg, k.delta), d);
  return select(linear, select(cmp_lt(d, zero), V(A(-1)), V(A(1))), k.exact_inv ? d * k.inv : d / k.delta);
}

// m (<= W) elements; the missing lanes read as 0, which gives d = 0 and a zero loss in every mode.
template <class A, class T>
inline Vec<A> load_m(const T* p, int m) {
  return m == Vec<A>::W ? Vec<A>::load(p) : Vec<A>::load_partial(p, m, A(0));
}

template <class A, class T>
inline void store_m(Vec<A> v, T* p, int m, bool nt) {
  if (m != Vec<A>::W)
    v.store_partial(p, m);
  else if (nt)
    v.stream(p);
  else
    v.store(p);
}

// Non-temporal stores need a vector-aligned destination; pieces of a strided walk may not have one.
template <class A, class T>
inline bool can_stream(bool want, const T* p) {
  return want && reinterpret_cast<uintptr_t>(p) % (sizeof(T) * Vec<A>::W) == 0;
}

// ------------------------------------------------------------------------------------------------
// Vector loops over contiguous pieces.
// ------------------------------------------------------------------------------------------------

// Sums the loss into acc (four vectors: each lane takes at most block / (4 W) terms). With GRAD it
// also writes the gradient that a scalar upstream gradient of `scale` gives -- scale w slope(d) to gx,
// its negation to gy (where not null) -- in the same pass over memory (see huber_fwd_grad).
template <int MODE, bool HAS_W, bool GRAD, class A, class T, class TY, class TW>
inline void sum_piece(const T* x, const TY* y, const TW* w, int64_t n, const Consts<A>& k, Vec<A>* acc, A scale,
                      T* gx, TY* gy, bool stream) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const bool ntx = GRAD && can_stream<A>(stream, gx), nty = GRAD && can_stream<A>(stream, gy);
  const V sv(scale);
  auto one = [&](int64_t i, int m, V& sum) {
    const V d = load_m<A>(x + i, m) - load_m<A>(y + i, m);
    V l = loss_of<MODE>(d, k);
    V wv(A(1));
    if (HAS_W) {
      wv = load_m<A>(w + i, m);
      l = l * wv;
    }
    sum = sum + l;
    if (GRAD) {
      const V gd = (HAS_W ? sv * wv : sv) * slope_of<MODE>(d, k);
      if (gx) store_m(gd, gx + i, m, ntx);
      if (gy) store_m(vneg(gd), gy + i, m, nty);
    }
  };
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W)
    for (int u = 0; u < 4; ++u) one(i + u * W, W, acc[u]);
  for (; i < n; i += W) one(i, n - i < W ? int(n - i) : W, acc[0]);
}

template <int MODE, bool HAS_W, class A, class T, class TY, class TW>
inline void loss_piece(const T* x, const TY* y, const TW* w, int64_t n, const Consts<A>& k, A* out, bool stream) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const bool nt = can_stream<A>(stream, out);
  for (int64_t i = 0; i < n; i += W) {
    const int m = n - i < W ? int(n - i) : W;
    V l = loss_of<MODE>(load_m<A>(x + i, m) - load_m<A>(y + i, m), k);
    if (HAS_W) l = l * load_m<A>(w + i, m);
    store_m(l, out + i, m, nt);
  }
}

// Gradients: gx = g w slope(d), gy = -gx, gw = g loss(d), each formed in the accumulation type and
// rounded once at its store -- a loss scale in g reaches fp16/bf16 before any rounding can flush.
template <int MODE, bool HAS_W, bool G_VEC, class A, class T, class TY, class TW>
inline void grad_piece(const T* x, const TY* y, const TW* w, const A* g, A g_scalar, int64_t n, const Consts<A>& k,
                       T* gx, TY* gy, TW* gw, bool stream) {
  using V = Vec<A>;
  constexpr int W = V::W;
  const bool ntx = can_stream<A>(stream, gx), nty = can_stream<A>(stream, gy), ntw = can_stream<A>(stream, gw);
  const V gs(g_scalar);
  for (int64_t i = 0; i < n; i += W) {
    const int m = n - i < W ? int(n - i) : W;
    const V d = load_m<A>(x + i, m) - load_m<A>(y + i, m);
    V gv = G_VEC ? load_m<A>(g + i, m) : gs;
    if (gw) store_m(gv * loss_of<MODE>(d, k), gw + i, m, ntw);
    if (HAS_W) gv = gv * load_m<A>(w + i, m);
    const V gd = gv * slope_of<MODE>(d, k);
    if (gx) store_m(gd, gx + i, m, ntx);
    if (gy) store_m(vneg(gd), gy + i, m, nty);
  }
}

// ------------------------------------------------------------------------------------------------
// The walk: blocks -> runs along the innermost dim -> contiguous pieces.
// ------------------------------------------------------------------------------------------------

// f(i, n, ox, oy, ow, og): n consecutive elements of the iteration order starting at linear index i,
// their first element at element offsets ox, oy, ow, og from the operands' data pointers.
template <class F>
inline void for_each_run(const HuberArgs& a, int64_t i0, int64_t i1, F&& f) {
  if (a.ndim == 1) {
    f(i0, i1 - i0, i0 * a.x_st[0], i0 * a.y_st[0], i0 * a.w_st[0], i0 * a.g_st[0]);
    return;
  }
  int64_t idx[kHuberMaxDims];
  int64_t r = i0;
  for (int k = 0; k < a.ndim; ++k) {
    idx[k] = r % a.size[k];
    r /= a.size[k];
  }
  for (int64_t i = i0; i < i1;) {
    int64_t ox = 0, oy = 0, ow = 0, og = 0;
    for (int k = 0; k < a.ndim; ++k) {
      ox += idx[k] * a.x_st[k];
      oy += idx[k] * a.y_st[k];
      ow += idx[k] * a.w_st[k];
      og += idx[k] * a.g_st[k];
    }
    const int64_t left = a.size[0] - idx[0];
    const int64_t n = left < i1 - i ? left : i1 - i;
    f(i, n, ox, oy, ow, og);
    i += n;
    idx[0] = 0;
    for (int k = 1; k < a.ndim; ++k) {
      if (++idx[k] < a.size[k]) break;
      idx[k] = 0;
    }
  }
}

// A contiguous view of m elements of an operand with inner stride st: the data itself when st == 1,
// else a copy in buf (a fill when st == 0: a broadcast target row, a weight expanded along the run).
template <class T>
inline const T* piece(const T* p, int64_t st, int64_t j, int m, T* buf) {
  if (st == 1) return p + j;
  if (st == 0) {
    const T v = p[0];
    for (int t = 0; t < m; ++t) buf[t] = v;
    return buf;
  }
  const T* q = p + j * st;
  for (int t = 0; t < m; ++t) buf[t] = q[t * st];
  return buf;
}

// Splits a run of n elements into contiguous pieces: f(j, m, x, y, w, g) for [j, j + m).
template <class T, class TY, class TW, class A, class F>
inline void for_each_piece(const HuberArgs& a, int64_t n, const T* x, const TY* y, const TW* w, const A* g, F&& f) {
  const int64_t sx = a.x_st[0], sy = a.y_st[0], sw = a.w_st[0], sg = a.g_st[0];
  if (sx == 1 && sy == 1 && (!w || sw == 1) && (!g || sg == 1)) {
    f(int64_t(0), n, x, y, w, g);
    return;
  }
  alignas(64) T bx[kChunk];
  alignas(64) TY by[kChunk];
  alignas(64) TW bw[kChunk];
  alignas(64) A bg[kChunk];
  for (int64_t j = 0; j < n; j += kChunk) {
    const int m = n - j < kChunk ? int(n - j) : kChunk;
    f(j, int64_t(m), piece(x, sx, j, m, bx), piece(y, sy, j, m, by), w ? piece(w, sw, j, m, bw) : w,
      g ? piece(g, sg, j, m, bg) : g);
  }
}

inline int64_t num_blocks(const HuberArgs& a) { return (a.numel + a.block - 1) / a.block; }

// The walks below are instantiated per storage-type combination only; the mode and the weight's
// presence become template arguments of the piece loops (with_piece_options), once per contiguous
// piece of up to a block, where a test costs nothing. (Instantiating the walks per mode and option
// as well tripled this loss's build time and bought nothing: a walk's own work is per piece.)
template <class F>
inline void with_piece_options(const HuberArgs& a, F&& f) {
  auto with_w = [&](auto md) {
    if (a.w)
      f(md, std::true_type{});
    else
      f(md, std::false_type{});
  };
  switch (a.mode) {
    case kHuber: with_w(std::integral_constant<int, kHuber>{}); break;
    case kSmoothL1: with_w(std::integral_constant<int, kSmoothL1>{}); break;
    default: with_w(std::integral_constant<int, kL1>{}); break;
  }
}

// A reducing forward may also write the gradients for a scalar upstream gradient a.scale (gx or gy
// set: huber_fwd_grad, float32 / float64 only -- for fp16/bf16 they would have to be stored in fp32 to
// keep the single cast after the loss scale, so those instantiations leave the branch out).
template <class T, class TY, class TW, class A>
void forward_impl(const HuberArgs& a) {
  using V = Vec<A>;
  const T* X = static_cast<const T*>(a.x);
  const TY* Y = static_cast<const TY*>(a.y);
  const TW* Wt = static_cast<const TW*>(a.w);
  T* GX = static_cast<T*>(a.gx);
  TY* GY = static_cast<TY*>(a.gy);
  const A scale = A(a.scale);
  const Consts<A> k(a.delta);
  const int64_t nb = num_blocks(a);
  const bool reduce = a.partials != nullptr;
  const bool grad = GX || GY;
  A* out = static_cast<A*>(a.out);
  // Dynamic: the partials do not depend on which thread sums a block, and on a shared machine a
  // thread that is descheduled leaves its blocks to the other instead of stalling the join.
#pragma omp parallel for num_threads(a.nthreads) if (a.nthreads > 1) schedule(dynamic, 4)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t i0 = b * a.block, i1 = i0 + a.block < a.numel ? i0 + a.block : a.numel;
    V acc[4] = {V(A(0)), V(A(0)), V(A(0)), V(A(0))};
    for_each_run(a, i0, i1, [&](int64_t i, int64_t n, int64_t ox, int64_t oy, int64_t ow, int64_t) {
      for_each_piece<T, TY, TW, A>(a, n, X + ox, Y + oy, Wt ? Wt + ow : nullptr, static_cast<const A*>(nullptr),
                                   [&](int64_t j, int64_t m, const T* x, const TY* y, const TW* w, const A*) {
        const int64_t o = i + j;
        with_piece_options(a, [&](auto md, auto hw) {
          constexpr int M = decltype(md)::value;
          constexpr bool H = decltype(hw)::value;
          if (!reduce) return loss_piece<M, H>(x, y, w, m, k, out + o, a.stream);
          if constexpr (std::is_same<T, A>::value) {
            if (grad)
              return sum_piece<M, H, true>(x, y, w, m, k, acc, scale, GX ? GX + o : nullptr, GY ? GY + o : nullptr,
                                           a.stream);
          }
          sum_piece<M, H, false>(x, y, w, m, k, acc, scale, static_cast<T*>(nullptr), static_cast<TY*>(nullptr), false);
        });
      });
    });
    if (reduce) {
      // The lanes meet in double.
      alignas(64) A lanes[4 * V::W];
      for (int u = 0; u < 4; ++u) acc[u].store(lanes + u * V::W);
      double s = 0;
      for (int j = 0; j < 4 * V::W; ++j) s += double(lanes[j]);
      a.partials[b] = s;
    }
  }
  if (a.stream) store_fence();
}

template <class T, class TY, class TW, class A>
void backward_impl(const HuberArgs& a) {
  const T* X = static_cast<const T*>(a.x);
  const TY* Y = static_cast<const TY*>(a.y);
  const TW* Wt = static_cast<const TW*>(a.w);
  const A* G = static_cast<const A*>(a.g);
  T* GX = static_cast<T*>(a.gx);
  TY* GY = static_cast<TY*>(a.gy);
  TW* GW = static_cast<TW*>(a.gw);
  const bool g_vec = !a.g_scalar;
  const A g_scalar = g_vec ? A(0) : G[0];
  const Consts<A> k(a.delta);
  const int64_t nb = num_blocks(a);
#pragma omp parallel for num_threads(a.nthreads) if (a.nthreads > 1) schedule(dynamic, 4)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t i0 = b * a.block, i1 = i0 + a.block < a.numel ? i0 + a.block : a.numel;
    for_each_run(a, i0, i1, [&](int64_t i, int64_t n, int64_t ox, int64_t oy, int64_t ow, int64_t og) {
      for_each_piece<T, TY, TW, A>(
          a, n, X + ox, Y + oy, Wt ? Wt + ow : nullptr, g_vec ? G + og : nullptr,
          [&](int64_t j, int64_t m, const T* x, const TY* y, const TW* w, const A* g) {
            const int64_t o = i + j;
            with_piece_options(a, [&](auto md, auto hw) {
              constexpr int M = decltype(md)::value;
              constexpr bool H = decltype(hw)::value;
              T* gx = GX ? GX + o : nullptr;
              TY* gy = GY ? GY + o : nullptr;
              TW* gw = GW ? GW + o : nullptr;
              if (g_vec)
                grad_piece<M, H, true>(x, y, w, g, g_scalar, m, k, gx, gy, gw, a.stream);
              else
                grad_piece<M, H, false>(x, y, w, g, g_scalar, m, k, gx, gy, gw, a.stream);
            });
          });
    });
  }
  if (a.stream) store_fence();
}

// ------------------------------------------------------------------------------------------------
// Dispatch: the storage types of target and weight (the input's type or the accumulation type).
// ------------------------------------------------------------------------------------------------

template <class T, class A, class F>
inline void with_types(const HuberArgs& a, F&& f) {
  // For float and double inputs T == A: one combination. fp16/bf16 read a float target or weight too.
  auto with_w = [&](auto ty) {
    if (a.w && a.w_acc)
      f(ty, std::common_type<A>{});
    else
      f(ty, std::common_type<T>{});
  };
  if (a.y_acc)
    with_w(std::common_type<A>{});
  else
    with_w(std::common_type<T>{});
}

template <class T, class A>
void forward_t(const HuberArgs& a) {
  with_types<T, A>(a, [&](auto ty, auto tw) {
    forward_impl<T, typename decltype(ty)::type, typename decltype(tw)::type, A>(a);
  });
}

template <class T, class A>
void backward_t(const HuberArgs& a) {
  with_types<T, A>(a, [&](auto ty, auto tw) {
    backward_impl<T, typename decltype(ty)::type, typename decltype(tw)::type, A>(a);
  });
}

}  // namespace huber

inline void huber_forward(const HuberArgs& a) {
  return with_dtype(a.dtype, [&](auto t, auto acc) { return huber::forward_t<decltype(t), decltype(acc)>(a); });
}

inline void huber_backward(const HuberArgs& a) {
  return with_dtype(a.dtype, [&](auto t, auto acc) { return huber::backward_t<decltype(t), decltype(acc)>(a); });
}
