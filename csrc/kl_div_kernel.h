// kl_div CPU kernels (lossfuse/ops/kl_div.py): torch's elementwise KL divergence term and its gradients
// over contiguous operands of one dtype. Compiled once per instruction set by isa_instantiate.h (no
// include guard). KlArgs is defined in kl_div.cpp.
//
//   log_target = false: loss = xlogy(t, t) - t x   (0 log 0 = 0), d/dx = -t, d/dt = log t + 1 - x
//   log_target = true:  loss = e^t (t - x),          d/dx = -e^t, d/dt = e^t (t - x + 1)
// d/dt at t = 0 (log_target false) is NaN, as torch's autograd returns there (xlogy's 0 / 0).

#include "walk.h"

template <class A>
struct KlTerms {
  using V = Vec<A>;
  bool log_target;
  V loss(V x, V t) const {
    if (log_target) return vexp(t) * (t - x);
    const V tlogt = select(cmp_eq(t, V(A(0))), V(A(0)), t * vlog(t));  // select: 0 * log 0 would be NaN
    return tlogt - t * x;
  }
  V dx(V t) const { return log_target ? vneg(vexp(t)) : vneg(t); }
  V dt(V x, V t) const {
    if (log_target) return vexp(t) * ((t - x) + V(A(1)));
    const V nan(std::numeric_limits<A>::quiet_NaN());
    return select(cmp_eq(t, V(A(0))), nan, (vlog(t) + V(A(1))) - x);
  }
};

// Calls body(c, kk) for every vector of elements [0, n) -- kk live lanes, W but at a chunk's end -- in
// parallel chunks of kBlock elements. Each thread works on its own copy of body (firstprivate), so that
// what it captures by value stays in registers instead of being reloaded around every vector store.
template <class A, class Body>
inline void for_each_vector(int64_t n, int nthreads, Body body) {
  constexpr int W = Vec<A>::W;
  const int64_t chunks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(nthreads) schedule(static) firstprivate(body)
  for (int64_t b = 0; b < chunks; ++b) {
    const int64_t c1 = (b + 1) * kBlock < n ? (b + 1) * kBlock : n;
    for (int64_t c = b * kBlock; c < c1; c += W) body(c, c1 - c < W ? int(c1 - c) : W);
  }
}

// The forward (per-element losses, or float64 partial sums of a.block elements) and the backward of
// one dtype. Padding lanes read x = 0, t = 1 (log_target false: 1 log 1 - 0 = 0); the sums mask them anyway.
template <class T, class A>
int kl_t(const KlArgs& a, bool backward) {
  using V = Vec<A>;
  const T* X = static_cast<const T*>(a.x);
  const T* Y = static_cast<const T*>(a.t);
  const KlTerms<A> k{a.log_target};
  if (backward) {
    const A* G = static_cast<const A*>(a.g);
    T* GX = static_cast<T*>(a.gx);
    T* GT = static_cast<T*>(a.gt);
    const bool g_elementwise = a.g_elementwise;
    for_each_vector<A>(a.n, a.nthreads, [=](int64_t c, int kk) {
      const V t = load_k(Y + c, kk, A(1));
      // The upstream gradient times the derivative in fp32, then the one cast.
      const V g = g_elementwise ? load_k(G + c, kk, A(0)) : V(G[0]);
      if (GX) store_k(g * k.dx(t), GX + c, kk);
      if (GT) store_k(g * k.dt(load_k(X + c, kk, A(0)), t), GT + c, kk);
    });
  } else if (a.block == 0) {
    A* out = static_cast<A*>(a.loss);
    for_each_vector<A>(a.n, a.nthreads, [=](int64_t c, int kk) {
      store_k(k.loss(load_k(X + c, kk, A(0)), load_k(Y + c, kk, A(1))), out + c, kk);
    });
  } else {
    const int64_t n = a.n, blocks = (n + a.block - 1) / a.block;
    double* partials = static_cast<double*>(a.loss);
#pragma omp parallel for num_threads(a.nthreads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c0 = b * a.block, c1 = c0 + a.block < n ? c0 + a.block : n;
      V s0(A(0));
      for (int64_t c = c0; c < c1; c += V::W) {
        const int kk = c1 - c < V::W ? int(c1 - c) : V::W;
        s0 = s0 + select(V::first(kk), k.loss(load_k(X + c, kk, A(0)), load_k(Y + c, kk, A(1))), V(A(0)));
      }
      partials[b] = double(hsum(s0));
    }
  }
  return 0;
}

inline int kl_run(const KlArgs& a, bool backward) {
  return with_dtype(a.dtype, [&](auto t, auto acc) { return kl_t<decltype(t), decltype(acc)>(a, backward); });
}
