// Vector math for the CPU kernels, compiled once per instruction set (see isa_instantiate.h): with
// LF_VEC_AVX2 defined, Vec<float> is eight fp32 lanes (AVX2 + FMA + F16C); otherwise one lane of
// portable C++. Vec<double> is always one lane: double inputs exist for gradcheck, not for speed.
//
// No include guard and no #include: this file is pasted into a namespace per instruction set.
// common.h has already brought in the system headers.

// One lane of A: Vec<double> on every instruction set, and Vec<float> in the portable build (the AVX2
// build specialises Vec<float> below). The operations are friends defined in the class: each Vec<A> gets
// plain (non-template) overloads of its own, to which a scalar A still converts as an argument.
template <class A>
struct Vec {
  static constexpr int W = 1;
  using Mask = bool;
  A v;

  Vec() = default;
  Vec(A a) : v(a) {}

  template <class T>
  static Vec load(const T* p) { return to_acc<A>(*p); }
  template <class T>
  static Vec load_partial(const T* p, int n, A fill) { return n > 0 ? to_acc<A>(*p) : fill; }
  template <class T>
  void store(T* p) const { put(p, v); }
  template <class T>
  void store_partial(T* p, int n) const { if (n > 0) put(p, v); }
  template <class T>
  void stream(T* p) const { put(p, v); }
  static Mask first(int k) { return k > 0; }
  static Mask mask(const bool* on) { return on[0]; }
  A lane(int) const { return v; }

  friend Vec operator+(Vec a, Vec b) { return a.v + b.v; }
  friend Vec operator-(Vec a, Vec b) { return a.v - b.v; }
  friend Vec operator*(Vec a, Vec b) { return a.v * b.v; }
  friend Vec operator/(Vec a, Vec b) { return a.v / b.v; }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return std::fma(a.v, b.v, c.v); }
  friend Vec fnmadd(Vec a, Vec b, Vec c) { return std::fma(-a.v, b.v, c.v); }
  friend Vec vmax(Vec a, Vec b) { return a.v > b.v ? a.v : b.v; }
  friend Vec vmin(Vec a, Vec b) { return a.v < b.v ? a.v : b.v; }
  friend Vec vabs(Vec a) { return std::fabs(a.v); }
  friend Vec vneg(Vec a) { return -a.v; }
  friend bool cmp_lt(Vec a, Vec b) { return a.v < b.v; }
  friend bool cmp_le(Vec a, Vec b) { return a.v <= b.v; }
  friend bool cmp_eq(Vec a, Vec b) { return a.v == b.v; }
  friend bool mask_none(Vec) { return false; }
  friend Vec select(bool m, Vec a, Vec b) { return m ? a : b; }
  friend Vec zero_where(bool m, Vec a) { return m ? A(0) : a.v; }
  friend Vec count_add(Vec n, bool m) { return m ? n.v + A(1) : n.v; }
  friend Vec count_value(Vec n) { return n; }
  friend A hsum(Vec a) { return a.v; }
  friend A hmax(Vec a) { return a.v; }
  friend Vec vexp(Vec a) { return std::exp(a.v); }
  friend Vec vexp_normal(Vec a, bool&) { return std::exp(a.v); }
  friend Vec vexp_sum_term(Vec a) { return std::exp(a.v); }
  friend Vec vexpm1(Vec a) { return std::expm1(a.v); }
  friend Vec vtanh(Vec a) { return std::tanh(a.v); }
  friend Vec vlog(Vec a) { return std::log(a.v); }
  friend Vec vlog1p(Vec a) { return std::log1p(a.v); }
};

// One-lane masks are plain bools.
inline bool mask_and(bool a, bool b) { return a && b; }
inline bool mask_or(bool a, bool b) { return a || b; }
inline bool mask_any(bool m) { return m; }


#if defined(LF_VEC_AVX2)

template <>
struct Vec<float> {
  static constexpr int W = 8;
  using Mask = __m256;
  __m256 v;

  Vec() = default;
  Vec(__m256 x) : v(x) {}
  explicit Vec(float a) : v(_mm256_set1_ps(a)) {}

  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec load(const half_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static Vec load(const bf16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  // Elements [n, 8) read as `fill`: the neutral value of whatever the caller reduces.
  template <class T>
  static Vec load_partial(const T* p, int n, float fill) {
    T buf[W];
    const T f = from_float<T>(fill);
    for (int i = 0; i < W; ++i) buf[i] = i < n ? p[i] : f;
    return load(buf);
  }

  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(half_t* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  void store(bf16_t* p) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16()); }
  // Non-temporal stores for outputs much larger than the caches; p aligned to W * sizeof(T) bytes.
  void stream(float* p) const { _mm256_stream_ps(p, v); }
  void stream(half_t* p) const {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  void stream(bf16_t* p) const { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16()); }
  // Round to nearest even as float_to_bf16 does, NaN kept quiet (see common.h).
  __m128i to_bf16() const {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
    r = _mm256_srli_epi32(r, 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
  template <class T>
  void store_partial(T* p, int n) const {
    T buf[W];
    store(buf);
    for (int i = 0; i < n; ++i) p[i] = buf[i];
  }

  // Lanes [0, k) on.
  static Mask first(int k) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(k), iota));
  }
  static Mask mask(const bool* on) {
    alignas(32) int32_t b[W];
    for (int i = 0; i < W; ++i) b[i] = on[i] ? -1 : 0;
    return _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(b)));
  }

  float lane(int i) const {
    alignas(32) float b[W];
    _mm256_store_ps(b, v);
    return b[i];
  }
};

inline Vec<float> operator+(Vec<float> a, Vec<float> b) { return _mm256_add_ps(a.v, b.v); }
inline Vec<float> operator-(Vec<float> a, Vec<float> b) { return _mm256_sub_ps(a.v, b.v); }
inline Vec<float> operator*(Vec<float> a, Vec<float> b) { return _mm256_mul_ps(a.v, b.v); }
inline Vec<float> operator/(Vec<float> a, Vec<float> b) { return _mm256_div_ps(a.v, b.v); }
// a * b + c and c - a * b, one rounding each.
inline Vec<float> fmadd(Vec<float> a, Vec<float> b, Vec<float> c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
inline Vec<float> fnmadd(Vec<float> a, Vec<float> b, Vec<float> c) { return _mm256_fnmadd_ps(a.v, b.v, c.v); }
// x86 max/min return the second operand when either is NaN; callers that must see NaN put the data
// second. Reductions by max may drop a NaN: the kernels' exp-sum pass is what propagates it.
inline Vec<float> vmax(Vec<float> a, Vec<float> b) { return _mm256_max_ps(a.v, b.v); }
inline Vec<float> vmin(Vec<float> a, Vec<float> b) { return _mm256_min_ps(a.v, b.v); }
inline Vec<float> vabs(Vec<float> a) {
  return _mm256_and_ps(a.v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
}
inline Vec<float> vneg(Vec<float> a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }
inline Vec<float>::Mask cmp_lt(Vec<float> a, Vec<float> b) { return _mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ); }
inline Vec<float>::Mask cmp_le(Vec<float> a, Vec<float> b) { return _mm256_cmp_ps(a.v, b.v, _CMP_LE_OQ); }
inline Vec<float>::Mask cmp_eq(Vec<float> a, Vec<float> b) { return _mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ); }
inline Vec<float>::Mask mask_and(Vec<float>::Mask a, Vec<float>::Mask b) { return _mm256_and_ps(a, b); }
inline Vec<float>::Mask mask_or(Vec<float>::Mask a, Vec<float>::Mask b) { return _mm256_or_ps(a, b); }
inline Vec<float>::Mask mask_none(Vec<float>) { return _mm256_setzero_ps(); }
inline bool mask_any(Vec<float>::Mask m) { return _mm256_movemask_ps(m) != 0; }
// Lane-wise choice: `m ? a : b`. Used instead of multiplying by 0/1 so that inf and NaN in the
// branch not taken cannot leak into the result (0 * inf = NaN).
inline Vec<float> select(Vec<float>::Mask m, Vec<float> a, Vec<float> b) { return _mm256_blendv_ps(b.v, a.v, m); }

// a where m is off, 0 where it is on: one AND-NOT where select(m, 0, a) is a blend.
inline Vec<float> zero_where(Vec<float>::Mask m, Vec<float> a) { return _mm256_andnot_ps(m, a.v); }
// Per-lane counters held as 32-bit integers in the lanes' bits (start from Vec(0.0f), all bits 0):
// adding a mask, whose on lanes are all ones (-1), is one integer subtract. count_value reads them.
inline Vec<float> count_add(Vec<float> n, Vec<float>::Mask m) {
  return _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_castps_si256(n.v), _mm256_castps_si256(m)));
}
inline Vec<float> count_value(Vec<float> n) { return _mm256_cvtepi32_ps(_mm256_castps_si256(n.v)); }

// Orders earlier streaming stores before later stores.
inline void store_fence() { _mm_sfence(); }

inline float hsum(Vec<float> a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmax(Vec<float> a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

namespace detail {
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;  // ln 2 split so that n * kLn2Hi is exact for |n| < 2^9
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpLo = -87.33654f;  // e^kExpLo is the smallest normal float
// 1.5 * 2^23 + 127: added to x*log2(e), it rounds to an integer n and leaves n + 127 -- the biased
// exponent of 2^n -- in the low mantissa bits, one FMA instead of a multiply, a round and a convert.
constexpr float kShifter = 12582912.0f + 127.0f;

// (e^r - 1) / r on |r| <= ln2/2, a degree-5 fit (relative error 7e-9 in exact arithmetic, < 1 ulp
// in fp32 for e^r = 1 + r * q).
inline __m256 expm1_q(__m256 r) {
  __m256 y = _mm256_set1_ps(1.3568669091910124e-3f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.37229285389185e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.167351499199867e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.16666483879089355f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.49999967217445374f));
  return _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
}

struct ExpParts {
  __m256 n, r, t;  // x = n ln2 + r; t holds n + 127 in its low bits
};
inline ExpParts exp_reduce(__m256 x) {
  ExpParts e;
  e.t = _mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), _mm256_set1_ps(kShifter));
  e.n = _mm256_sub_ps(e.t, _mm256_set1_ps(kShifter));
  e.r = _mm256_fnmadd_ps(e.n, _mm256_set1_ps(kLn2Hi), x);
  e.r = _mm256_fnmadd_ps(e.n, _mm256_set1_ps(kLn2Lo), e.r);
  return e;
}
// 2^n read off the shifter sum: valid while n + 127 is in [1, 255] (255 gives infinity).
inline __m256 pow2_from_shifted(__m256 t) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)); }
// 2^n for integral float n in [-126, 128].
inline __m256 pow2i(__m256 n) {
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
}  // namespace detail

// e^x for x <= 88 and e^x >= the smallest normal float (x >= -87.33); lanes below that produce
// garbage and set their bit in `oob`, so a caller that writes e^x out can redo those rows exactly
// with vexp. NaN stays NaN. The hot loops of the backward passes use this one.
inline Vec<float> vexp_normal(Vec<float> a, Vec<float>::Mask& oob) {
  oob = _mm256_or_ps(oob, _mm256_cmp_ps(a.v, _mm256_set1_ps(detail::kExpLo), _CMP_LT_OQ));
  const detail::ExpParts e = detail::exp_reduce(a.v);
  const __m256 p = _mm256_fmadd_ps(detail::expm1_q(e.r), e.r, _mm256_set1_ps(1.0f));
  return _mm256_mul_ps(p, detail::pow2_from_shifted(e.t));
}

// e^x for x <= 88 with x clamped below at -87.33 (1.2e-38 there): vexp_normal's value wherever that
// one is in range (the fused softmax-focal row relies on the equality). Only for terms of a softmax
// denominator, whose largest term is e^0 = 1, where the clamped ones cannot show.
inline Vec<float> vexp_sum_term(Vec<float> a) {
  const __m256 x = _mm256_max_ps(_mm256_set1_ps(detail::kExpLo), a.v);  // NaN passes through
  const detail::ExpParts e = detail::exp_reduce(x);
  const __m256 p = _mm256_fmadd_ps(detail::expm1_q(e.r), e.r, _mm256_set1_ps(1.0f));
  return _mm256_mul_ps(p, detail::pow2_from_shifted(e.t));
}

// e^x for every x: NaN -> NaN, +inf -> inf, -inf -> 0, subnormal results kept (not flushed): a softmax
// probability of 1e-40 scaled by 2^16 is a representable bf16 gradient and must not vanish.
inline Vec<float> vexp(Vec<float> a) {
  const __m256 x = _mm256_min_ps(_mm256_set1_ps(88.8f), _mm256_max_ps(_mm256_set1_ps(-104.5f), a.v));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(detail::kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(detail::kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(detail::kLn2Lo), r);
  const __m256 p = _mm256_fmadd_ps(detail::expm1_q(r), r, _mm256_set1_ps(1.0f));
  // 2^n as two factors that are both normal floats, so results down to 2^-149 and up to inf come out right.
  const __m256 n1 = _mm256_round_ps(_mm256_mul_ps(n, _mm256_set1_ps(0.5f)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m256 n2 = _mm256_sub_ps(n, n1);
  return _mm256_mul_ps(_mm256_mul_ps(p, detail::pow2i(n1)), detail::pow2i(n2));
}

// e^x - 1 without the cancellation near 0 (relative error ~1 ulp there), for x <= 88. The target
// element of a cross-entropy gradient is p_y - 1 = expm1(x_y - lse): a confident, correct
// prediction's small gradient survives instead of rounding to 0.
inline Vec<float> vexpm1(Vec<float> a) {
  const __m256 x = _mm256_max_ps(_mm256_set1_ps(-88.0f), a.v);  // e^-88 - 1 == -1 in fp32
  const detail::ExpParts e = detail::exp_reduce(x);
  const __m256 rq = _mm256_mul_ps(detail::expm1_q(e.r), e.r);  // e^r - 1
  const __m256 pow2 = detail::pow2_from_shifted(e.t);
  // 2^n (1 + rq) - 1 = 2^n rq + (2^n - 1); for n = 0 that is rq itself.
  const __m256 big = _mm256_fmadd_ps(pow2, rq, _mm256_sub_ps(pow2, _mm256_set1_ps(1.0f)));
  const __m256 n0 = _mm256_cmp_ps(e.n, _mm256_setzero_ps(), _CMP_EQ_OQ);
  return _mm256_blendv_ps(big, rq, n0);
}

// tanh(u) = expm1(2u) / (expm1(2u) + 2): no cancellation near 0; |u| clamped at 9, where tanh rounds to
// +-1 in fp32 and expm1 would overflow. NaN stays NaN. (Logit soft-capping: cap * tanh(x / cap).)
inline Vec<float> vtanh(Vec<float> a) {
  const __m256 u = _mm256_min_ps(_mm256_set1_ps(9.0f), _mm256_max_ps(_mm256_set1_ps(-9.0f), a.v));
  const __m256 em = vexpm1(Vec<float>(_mm256_add_ps(u, u))).v;
  return _mm256_div_ps(em, _mm256_add_ps(em, _mm256_set1_ps(2.0f)));
}

// Natural log, ~1 ulp (Cephes logf). log(0) = -inf, log(x<0) = NaN, log(inf) = inf, NaN -> NaN;
// subnormal inputs are scaled up first.
inline Vec<float> vlog(Vec<float> a) {
  __m256 x = a.v;
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
  x = _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(8388608.0f)), tiny);  // * 2^23
  __m256 e = _mm256_cvtepi32_ps(
      _mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(x), 23), _mm256_set1_epi32(126)));
  e = _mm256_sub_ps(e, _mm256_and_ps(tiny, _mm256_set1_ps(23.0f)));
  // mantissa in [0.5, 1)
  __m256 m = _mm256_or_ps(_mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x007FFFFF))),
                          _mm256_set1_ps(0.5f));
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.0f));
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  __m256 r = _mm256_add_ps(m, y);
  r = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), r);
  // Special values, by select so each lane gets exactly its own answer.
  const __m256 zero = _mm256_setzero_ps();
  r = _mm256_blendv_ps(r, _mm256_set1_ps(-INFINITY), _mm256_cmp_ps(a.v, zero, _CMP_EQ_OQ));
  r = _mm256_blendv_ps(r, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(a.v, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
  r = _mm256_blendv_ps(r, _mm256_set1_ps(NAN), _mm256_cmp_ps(a.v, zero, _CMP_NGE_UQ));  // < 0 or NaN
  return r;
}

// log(1 + u) accurate also for tiny u: the rounding of 1 + u is undone by the factor u / ((1+u) - 1).
inline Vec<float> vlog1p(Vec<float> u) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 w = _mm256_add_ps(one, u.v);
  const __m256 d = _mm256_sub_ps(w, one);
  const __m256 l = vlog(Vec<float>(w)).v;
  const __m256 corrected = _mm256_mul_ps(l, _mm256_div_ps(u.v, d));
  const __m256 exact = _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ);  // 1 + u == 1: log1p(u) = u
  const __m256 inf = _mm256_cmp_ps(w, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ);
  return _mm256_blendv_ps(_mm256_blendv_ps(corrected, u.v, exact), l, inf);
}

#else  // portable: Vec<float> is the one-lane Vec above

inline void store_fence() {}

#endif

// Scalar helpers in the accumulation type, for per-row values and loop tails.
inline float sexp(float x) { return std::exp(x); }
inline double sexp(double x) { return std::exp(x); }
inline float slog(float x) { return std::log(x); }
inline double slog(double x) { return std::log(x); }
inline float sexpm1(float x) { return std::expm1(x); }
inline float stanh(float x) { return std::tanh(x); }
inline double stanh(double x) { return std::tanh(x); }
inline double sexpm1(double x) { return std::expm1(x); }

// The kernels' entry points by dtype: f(T{}, A{}) with T the storage type and A its accumulation type
// (float for float/half/bf16, double for double), e.g.
//   with_dtype(a.dtype, [&](auto t, auto acc) { return kernel<decltype(t), decltype(acc)>(a); })
// The AVX2 build has no float64 kernels: use_avx2_for (common.h) sends float64 to the portable ones.
template <class F>
inline decltype(auto) with_dtype(Dtype d, F&& f) {
  switch (d) {
    case Dtype::F16: return f(half_t{}, float{});
    case Dtype::BF16: return f(bf16_t{}, float{});
#if defined(LF_VEC_AVX2)
    case Dtype::F64: __builtin_trap();
#else
    case Dtype::F64: return f(double{}, double{});
#endif
    case Dtype::F32: break;
  }
  return f(float{}, float{});
}
