// Vector math for the CPU kernels, compiled once per instruction set (see isa_instantiate.h): with
// LF_VEC_AVX2 defined, Vec<float> is eight fp32 lanes (AVX2 + FMA + F16C), sixteen with LF_VEC_AVX512
// as well (AVX-512 F/BW/DQ/VL); otherwise one lane of portable C++. Vec<double> is always one lane:
// double inputs exist for gradcheck, not for speed.
//
// No include guard and no #include: this file is pasted into a namespace per instruction set.
// common.h has already brought in the system headers.

// One lane of A: Vec<double> on every instruction set, and Vec<float> in the portable build (the x86
// builds specialise Vec<float> below). The operations are friends defined in the class: each Vec<A> gets
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

// The x86 builds: Vec<float> is one register of eight (AVX2 + FMA + F16C) or, with LF_VEC_AVX512
// also defined, sixteen (AVX-512 F/BW/DQ/VL) fp32 lanes. Both are written once below over these
// names; what differs in kind -- AVX-512 compares give a bit mask (__mmask16) where AVX2's give a
// vector of all-ones lanes -- sits in the two blocks right after them.
#if defined(LF_VEC_AVX512)
using vps = __m512;
using vsi = __m512i;
using vhalf = __m256i;  // W 16-bit values
#define LF_MM(name) _mm512_##name
#define LF_AS_SI(x) _mm512_castps_si512(x)
#define LF_AS_PS(x) _mm512_castsi512_ps(x)
#define LF_AND_SI(a, b) _mm512_and_si512(a, b)
#define LF_HALF_LOAD(p) _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
#define LF_HALF_STORE(p, h) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h)
#define LF_HALF_STREAM(p, h) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h)
#else
using vps = __m256;
using vsi = __m256i;
using vhalf = __m128i;
#define LF_MM(name) _mm256_##name
#define LF_AS_SI(x) _mm256_castps_si256(x)
#define LF_AS_PS(x) _mm256_castsi256_ps(x)
#define LF_AND_SI(a, b) _mm256_and_si256(a, b)
#define LF_HALF_LOAD(p) _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
#define LF_HALF_STORE(p, h) _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h)
#define LF_HALF_STREAM(p, h) _mm_stream_si128(reinterpret_cast<__m128i*>(p), h)
#endif
#define LF_SET(x) LF_MM(set1_ps)(x)
#define LF_SETI(x) LF_MM(set1_epi32)(x)

namespace detail {
#if defined(LF_VEC_AVX512)
constexpr int kW = 16;
using Mask = __mmask16;
inline Mask cmp_lt(vps a, vps b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline Mask cmp_le(vps a, vps b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
inline Mask cmp_eq(vps a, vps b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
inline Mask cmp_nge(vps a, vps b) { return _mm512_cmp_ps_mask(a, b, _CMP_NGE_UQ); }  // a < b or NaN
inline Mask is_nan(vps a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
inline vps blend(Mask m, vps a, vps b) { return _mm512_mask_blend_ps(m, b, a); }  // m ? a : b
inline vsi blend_i(Mask m, vsi a, vsi b) { return _mm512_mask_blend_epi32(m, b, a); }
inline vps zero_where(Mask m, vps a) { return _mm512_maskz_mov_ps(Mask(~m), a); }
inline vsi sub_where(vsi n, Mask m) { return _mm512_mask_sub_epi32(n, m, n, _mm512_set1_epi32(-1)); }  // +1 on m
inline Mask first(int k) { return k >= kW ? Mask(0xFFFF) : k <= 0 ? Mask(0) : Mask((1u << k) - 1); }
inline Mask mask_or(Mask a, Mask b) { return Mask(a | b); }
inline Mask mask_and(Mask a, Mask b) { return Mask(a & b); }
inline bool mask_any(Mask m) { return m != 0; }
inline Mask mask_none() { return 0; }
inline Mask mask_of(const bool* on) {
  unsigned m = 0;
  for (int i = 0; i < kW; ++i) m |= unsigned(on[i]) << i;
  return Mask(m);
}
inline vps round_nearest(vps x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vps round_down(vps x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline vhalf to_f16(vps v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
inline vps from_f16(vhalf h) { return _mm512_cvtph_ps(h); }
inline vhalf narrow_u16(vsi r) { return _mm512_cvtepi32_epi16(r); }  // r's lanes hold 16-bit values
inline __m256 low_half(vps v) { return _mm512_castps512_ps256(v); }
inline __m256 high_half(vps v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }
#else
constexpr int kW = 8;
using Mask = __m256;  // lanes of all ones or all zeros
inline Mask cmp_lt(vps a, vps b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
inline Mask cmp_le(vps a, vps b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
inline Mask cmp_eq(vps a, vps b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
inline Mask cmp_nge(vps a, vps b) { return _mm256_cmp_ps(a, b, _CMP_NGE_UQ); }
inline Mask is_nan(vps a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
inline vps blend(Mask m, vps a, vps b) { return _mm256_blendv_ps(b, a, m); }
inline vsi blend_i(Mask m, vsi a, vsi b) { return _mm256_blendv_epi8(b, a, _mm256_castps_si256(m)); }
inline vps zero_where(Mask m, vps a) { return _mm256_andnot_ps(m, a); }  // one AND-NOT, not a blend
inline vsi sub_where(vsi n, Mask m) { return _mm256_sub_epi32(n, _mm256_castps_si256(m)); }  // on lanes are -1
inline Mask first(int k) {
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}
inline Mask mask_or(Mask a, Mask b) { return _mm256_or_ps(a, b); }
inline Mask mask_and(Mask a, Mask b) { return _mm256_and_ps(a, b); }
inline bool mask_any(Mask m) { return _mm256_movemask_ps(m) != 0; }
inline Mask mask_none() { return _mm256_setzero_ps(); }
inline Mask mask_of(const bool* on) {
  alignas(32) int32_t b[kW];
  for (int i = 0; i < kW; ++i) b[i] = on[i] ? -1 : 0;
  return _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(b)));
}
inline vps round_nearest(vps x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vps round_down(vps x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline vhalf to_f16(vps v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
inline vps from_f16(vhalf h) { return _mm256_cvtph_ps(h); }
inline vhalf narrow_u16(vsi r) { return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)); }
inline __m256 low_half(vps v) { return v; }
#endif
}  // namespace detail

template <>
struct Vec<float> {
  static constexpr int W = detail::kW;
  using Mask = detail::Mask;
  vps v;

  Vec() = default;
  Vec(vps x) : v(x) {}
  explicit Vec(float a) : v(LF_SET(a)) {}

  static Vec load(const float* p) { return LF_MM(loadu_ps)(p); }
  static Vec load(const half_t* p) { return detail::from_f16(LF_HALF_LOAD(p)); }
  static Vec load(const bf16_t* p) { return LF_AS_PS(LF_MM(slli_epi32)(LF_MM(cvtepu16_epi32)(LF_HALF_LOAD(p)), 16)); }
  // Elements [n, W) read as `fill`: the neutral value of whatever the caller reduces.
  template <class T>
  static Vec load_partial(const T* p, int n, float fill) {
    T buf[W];
    const T f = from_float<T>(fill);
    for (int i = 0; i < W; ++i) buf[i] = i < n ? p[i] : f;
    return load(buf);
  }

  void store(float* p) const { LF_MM(storeu_ps)(p, v); }
  void store(half_t* p) const { LF_HALF_STORE(p, detail::to_f16(v)); }
  void store(bf16_t* p) const { LF_HALF_STORE(p, to_bf16()); }
  // Non-temporal stores for outputs much larger than the caches; p aligned to W * sizeof(T) bytes.
  void stream(float* p) const { LF_MM(stream_ps)(p, v); }
  void stream(half_t* p) const { LF_HALF_STREAM(p, detail::to_f16(v)); }
  void stream(bf16_t* p) const { LF_HALF_STREAM(p, to_bf16()); }
  // Round to nearest even as float_to_bf16 does, NaN kept quiet (see common.h).
  vhalf to_bf16() const {
    const vsi u = LF_AS_SI(v);
    const vsi odd = LF_AND_SI(LF_MM(srli_epi32)(u, 16), LF_SETI(1));
    vsi r = LF_MM(add_epi32)(u, LF_MM(add_epi32)(odd, LF_SETI(0x7FFF)));
    r = LF_MM(srli_epi32)(r, 16);
    r = detail::blend_i(detail::is_nan(v), LF_SETI(0x7FC0), r);
    return detail::narrow_u16(r);
  }
  template <class T>
  void store_partial(T* p, int n) const {
    T buf[W];
    store(buf);
    for (int i = 0; i < n; ++i) p[i] = buf[i];
  }

  // Lanes [0, k) on.
  static Mask first(int k) { return detail::first(k); }
  static Mask mask(const bool* on) { return detail::mask_of(on); }

  float lane(int i) const {
    alignas(64) float b[W];
    LF_MM(store_ps)(b, v);
    return b[i];
  }
};

inline Vec<float> operator+(Vec<float> a, Vec<float> b) { return LF_MM(add_ps)(a.v, b.v); }
inline Vec<float> operator-(Vec<float> a, Vec<float> b) { return LF_MM(sub_ps)(a.v, b.v); }
inline Vec<float> operator*(Vec<float> a, Vec<float> b) { return LF_MM(mul_ps)(a.v, b.v); }
inline Vec<float> operator/(Vec<float> a, Vec<float> b) { return LF_MM(div_ps)(a.v, b.v); }
// a * b + c and c - a * b, one rounding each.
inline Vec<float> fmadd(Vec<float> a, Vec<float> b, Vec<float> c) { return LF_MM(fmadd_ps)(a.v, b.v, c.v); }
inline Vec<float> fnmadd(Vec<float> a, Vec<float> b, Vec<float> c) { return LF_MM(fnmadd_ps)(a.v, b.v, c.v); }
// x86 max/min return the second operand when either is NaN; callers that must see NaN put the data
// second. Reductions by max may drop a NaN: the kernels' exp-sum pass is what propagates it.
inline Vec<float> vmax(Vec<float> a, Vec<float> b) { return LF_MM(max_ps)(a.v, b.v); }
inline Vec<float> vmin(Vec<float> a, Vec<float> b) { return LF_MM(min_ps)(a.v, b.v); }
inline Vec<float> vabs(Vec<float> a) { return LF_MM(and_ps)(a.v, LF_AS_PS(LF_SETI(0x7FFFFFFF))); }
inline Vec<float> vneg(Vec<float> a) { return LF_MM(xor_ps)(a.v, LF_SET(-0.0f)); }
inline Vec<float>::Mask cmp_lt(Vec<float> a, Vec<float> b) { return detail::cmp_lt(a.v, b.v); }
inline Vec<float>::Mask cmp_le(Vec<float> a, Vec<float> b) { return detail::cmp_le(a.v, b.v); }
inline Vec<float>::Mask cmp_eq(Vec<float> a, Vec<float> b) { return detail::cmp_eq(a.v, b.v); }
inline Vec<float>::Mask mask_and(Vec<float>::Mask a, Vec<float>::Mask b) { return detail::mask_and(a, b); }
inline Vec<float>::Mask mask_or(Vec<float>::Mask a, Vec<float>::Mask b) { return detail::mask_or(a, b); }
inline Vec<float>::Mask mask_none(Vec<float>) { return detail::mask_none(); }
inline bool mask_any(Vec<float>::Mask m) { return detail::mask_any(m); }
// Lane-wise choice: `m ? a : b`. Used instead of multiplying by 0/1 so that inf and NaN in the
// branch not taken cannot leak into the result (0 * inf = NaN).
inline Vec<float> select(Vec<float>::Mask m, Vec<float> a, Vec<float> b) { return detail::blend(m, a.v, b.v); }

// a where m is off, 0 where it is on.
inline Vec<float> zero_where(Vec<float>::Mask m, Vec<float> a) { return detail::zero_where(m, a.v); }
// Per-lane counters held as 32-bit integers in the lanes' bits (start from Vec(0.0f), all bits 0):
// count_add adds one where m is on; count_value reads them.
inline Vec<float> count_add(Vec<float> n, Vec<float>::Mask m) { return LF_AS_PS(detail::sub_where(LF_AS_SI(n.v), m)); }
inline Vec<float> count_value(Vec<float> n) { return LF_MM(cvtepi32_ps)(LF_AS_SI(n.v)); }

// Orders earlier streaming stores before later stores.
inline void store_fence() { _mm_sfence(); }

namespace detail {
inline __m256 add8(__m256 x, __m256 y) { return _mm256_add_ps(x, y); }
inline __m256 max8(__m256 x, __m256 y) { return _mm256_max_ps(x, y); }
inline __m128 add4(__m128 x, __m128 y) { return _mm_add_ps(x, y); }
inline __m128 max4(__m128 x, __m128 y) { return _mm_max_ps(x, y); }
// The lanes folded pairwise down to one by Op8 / Op4 (on 256- and 128-bit registers): the AVX-512
// register folds its halves first.
template <__m256 (*Op8)(__m256, __m256), __m128 (*Op4)(__m128, __m128)>
inline float fold_lanes(vps v) {
#if defined(LF_VEC_AVX512)
  const __m256 h = Op8(low_half(v), high_half(v));
#else
  const __m256 h = v;
#endif
  __m128 s = Op4(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = Op4(s, _mm_movehl_ps(s, s));
  s = Op4(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
}  // namespace detail

inline float hsum(Vec<float> a) { return detail::fold_lanes<detail::add8, detail::add4>(a.v); }
inline float hmax(Vec<float> a) { return detail::fold_lanes<detail::max8, detail::max4>(a.v); }

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
inline vps expm1_q(vps r) {
  vps y = LF_SET(1.3568669091910124e-3f);
  y = LF_MM(fmadd_ps)(y, r, LF_SET(8.37229285389185e-3f));
  y = LF_MM(fmadd_ps)(y, r, LF_SET(4.167351499199867e-2f));
  y = LF_MM(fmadd_ps)(y, r, LF_SET(0.16666483879089355f));
  y = LF_MM(fmadd_ps)(y, r, LF_SET(0.49999967217445374f));
  return LF_MM(fmadd_ps)(y, r, LF_SET(1.0f));
}

struct ExpParts {
  vps n, r, t;  // x = n ln2 + r; t holds n + 127 in its low bits
};
inline ExpParts exp_reduce(vps x) {
  ExpParts e;
  e.t = LF_MM(fmadd_ps)(x, LF_SET(kLog2e), LF_SET(kShifter));
  e.n = LF_MM(sub_ps)(e.t, LF_SET(kShifter));
  e.r = LF_MM(fnmadd_ps)(e.n, LF_SET(kLn2Hi), x);
  e.r = LF_MM(fnmadd_ps)(e.n, LF_SET(kLn2Lo), e.r);
  return e;
}
// 2^n read off the shifter sum: valid while n + 127 is in [1, 255] (255 gives infinity).
inline vps pow2_from_shifted(vps t) { return LF_AS_PS(LF_MM(slli_epi32)(LF_AS_SI(t), 23)); }
// 2^n for integral float n in [-126, 128].
inline vps pow2i(vps n) {
  return LF_AS_PS(LF_MM(slli_epi32)(LF_MM(add_epi32)(LF_MM(cvtps_epi32)(n), LF_SETI(127)), 23));
}
}  // namespace detail

// e^x for x <= 88 and e^x >= the smallest normal float (x >= -87.33); lanes below that produce
// garbage and set their bit in `oob`, so a caller that writes e^x out can redo those rows exactly
// with vexp. NaN stays NaN. The hot loops of the backward passes use this one.
inline Vec<float> vexp_normal(Vec<float> a, Vec<float>::Mask& oob) {
  oob = detail::mask_or(oob, detail::cmp_lt(a.v, LF_SET(detail::kExpLo)));
  const detail::ExpParts e = detail::exp_reduce(a.v);
  const vps p = LF_MM(fmadd_ps)(detail::expm1_q(e.r), e.r, LF_SET(1.0f));
  return LF_MM(mul_ps)(p, detail::pow2_from_shifted(e.t));
}

// e^x for x <= 88 with x clamped below at -87.33 (1.2e-38 there): vexp_normal's value wherever that
// one is in range (the fused softmax-focal row relies on the equality). Only for terms of a softmax
// denominator, whose largest term is e^0 = 1, where the clamped ones cannot show.
inline Vec<float> vexp_sum_term(Vec<float> a) {
  const vps x = LF_MM(max_ps)(LF_SET(detail::kExpLo), a.v);  // NaN passes through
  const detail::ExpParts e = detail::exp_reduce(x);
  const vps p = LF_MM(fmadd_ps)(detail::expm1_q(e.r), e.r, LF_SET(1.0f));
  return LF_MM(mul_ps)(p, detail::pow2_from_shifted(e.t));
}

// e^x for every x: NaN -> NaN, +inf -> inf, -inf -> 0, subnormal results kept (not flushed): a softmax
// probability of 1e-40 scaled by 2^16 is a representable bf16 gradient and must not vanish.
inline Vec<float> vexp(Vec<float> a) {
  const vps x = LF_MM(min_ps)(LF_SET(88.8f), LF_MM(max_ps)(LF_SET(-104.5f), a.v));
  const vps n = detail::round_nearest(LF_MM(mul_ps)(x, LF_SET(detail::kLog2e)));
  vps r = LF_MM(fnmadd_ps)(n, LF_SET(detail::kLn2Hi), x);
  r = LF_MM(fnmadd_ps)(n, LF_SET(detail::kLn2Lo), r);
  const vps p = LF_MM(fmadd_ps)(detail::expm1_q(r), r, LF_SET(1.0f));
  // 2^n as two factors that are both normal floats, so results down to 2^-149 and up to inf come out right.
  const vps n1 = detail::round_down(LF_MM(mul_ps)(n, LF_SET(0.5f)));
  const vps n2 = LF_MM(sub_ps)(n, n1);
  return LF_MM(mul_ps)(LF_MM(mul_ps)(p, detail::pow2i(n1)), detail::pow2i(n2));
}

// e^x - 1 without the cancellation near 0 (relative error ~1 ulp there), for x <= 88. The target
// element of a cross-entropy gradient is p_y - 1 = expm1(x_y - lse): a confident, correct
// prediction's small gradient survives instead of rounding to 0.
inline Vec<float> vexpm1(Vec<float> a) {
  const vps x = LF_MM(max_ps)(LF_SET(-88.0f), a.v);  // e^-88 - 1 == -1 in fp32
  const detail::ExpParts e = detail::exp_reduce(x);
  const vps rq = LF_MM(mul_ps)(detail::expm1_q(e.r), e.r);  // e^r - 1
  const vps pow2 = detail::pow2_from_shifted(e.t);
  // 2^n (1 + rq) - 1 = 2^n rq + (2^n - 1); for n = 0 that is rq itself.
  const vps big = LF_MM(fmadd_ps)(pow2, rq, LF_MM(sub_ps)(pow2, LF_SET(1.0f)));
  return detail::blend(detail::cmp_eq(e.n, LF_SET(0.0f)), rq, big);
}

// tanh(u) = expm1(2u) / (expm1(2u) + 2): no cancellation near 0; |u| clamped at 9, where tanh rounds to
// +-1 in fp32 and expm1 would overflow. NaN stays NaN. (Logit soft-capping: cap * tanh(x / cap).)
inline Vec<float> vtanh(Vec<float> a) {
  const vps u = LF_MM(min_ps)(LF_SET(9.0f), LF_MM(max_ps)(LF_SET(-9.0f), a.v));
  const vps em = vexpm1(Vec<float>(LF_MM(add_ps)(u, u))).v;
  return LF_MM(div_ps)(em, LF_MM(add_ps)(em, LF_SET(2.0f)));
}

// Natural log, ~1 ulp (Cephes logf). log(0) = -inf, log(x<0) = NaN, log(inf) = inf, NaN -> NaN;
// subnormal inputs are scaled up first.
inline Vec<float> vlog(Vec<float> a) {
  using detail::blend;
  const vps zero = LF_SET(0.0f);
  vps x = a.v;
  const auto tiny = detail::cmp_lt(x, LF_SET(1.17549435e-38f));
  x = blend(tiny, LF_MM(mul_ps)(x, LF_SET(8388608.0f)), x);  // * 2^23
  vps e = LF_MM(cvtepi32_ps)(LF_MM(sub_epi32)(LF_MM(srli_epi32)(LF_AS_SI(x), 23), LF_SETI(126)));
  e = LF_MM(sub_ps)(e, blend(tiny, LF_SET(23.0f), zero));
  // mantissa in [0.5, 1)
  vps m = LF_MM(or_ps)(LF_MM(and_ps)(x, LF_AS_PS(LF_SETI(0x007FFFFF))), LF_SET(0.5f));
  const auto small = detail::cmp_lt(m, LF_SET(0.707106781186547524f));
  e = LF_MM(sub_ps)(e, blend(small, LF_SET(1.0f), zero));
  m = LF_MM(sub_ps)(LF_MM(add_ps)(m, blend(small, m, zero)), LF_SET(1.0f));
  const vps z = LF_MM(mul_ps)(m, m);
  vps y = LF_SET(7.0376836292e-2f);
  y = LF_MM(fmadd_ps)(y, m, LF_SET(-1.1514610310e-1f));
  y = LF_MM(fmadd_ps)(y, m, LF_SET(1.1676998740e-1f));
  y = LF_MM(fmadd_ps)(y, m, LF_SET(-1.2420140846e-1f));
  y = LF_MM(fmadd_ps)(y, m, LF_SET(1.4249322787e-1f));
  y = LF_MM(fmadd_ps)(y, m, LF_SET(-1.6668057665e-1f));
  y = LF_MM(fmadd_ps)(y, m, LF_SET(2.0000714765e-1f));
  y = LF_MM(fmadd_ps)(y, m, LF_SET(-2.4999993993e-1f));
  y = LF_MM(fmadd_ps)(y, m, LF_SET(3.3333331174e-1f));
  y = LF_MM(mul_ps)(LF_MM(mul_ps)(y, m), z);
  y = LF_MM(fmadd_ps)(e, LF_SET(-2.12194440e-4f), y);
  y = LF_MM(fnmadd_ps)(z, LF_SET(0.5f), y);
  vps r = LF_MM(add_ps)(m, y);
  r = LF_MM(fmadd_ps)(e, LF_SET(0.693359375f), r);
  // Special values, by select so each lane gets exactly its own answer.
  r = blend(detail::cmp_eq(a.v, zero), LF_SET(-INFINITY), r);
  r = blend(detail::cmp_eq(a.v, LF_SET(INFINITY)), LF_SET(INFINITY), r);
  r = blend(detail::cmp_nge(a.v, zero), LF_SET(NAN), r);  // < 0 or NaN
  return r;
}

// log(1 + u) accurate also for tiny u: the rounding of 1 + u is undone by the factor u / ((1+u) - 1).
inline Vec<float> vlog1p(Vec<float> u) {
  const vps one = LF_SET(1.0f);
  const vps w = LF_MM(add_ps)(one, u.v);
  const vps d = LF_MM(sub_ps)(w, one);
  const vps l = vlog(Vec<float>(w)).v;
  const vps corrected = LF_MM(mul_ps)(l, LF_MM(div_ps)(u.v, d));
  const auto exact = detail::cmp_eq(d, LF_SET(0.0f));  // 1 + u == 1: log1p(u) = u
  const auto inf = detail::cmp_eq(w, LF_SET(INFINITY));
  return detail::blend(inf, l, detail::blend(exact, u.v, corrected));
}

// Eight floats of a row as a 256-bit register, for the float64 (4-lane) sums of distillation_kernel.h.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const half_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const bf16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

#undef LF_MM
#undef LF_AS_SI
#undef LF_AS_PS
#undef LF_AND_SI
#undef LF_HALF_LOAD
#undef LF_HALF_STORE
#undef LF_HALF_STREAM
#undef LF_SET
#undef LF_SETI

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
// The x86 builds have no float64 kernels: isa_for (common.h) sends float64 to the portable ones.
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
