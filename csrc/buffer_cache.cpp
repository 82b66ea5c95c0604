// A small cache of large CPU output buffers (the N x C gradients).
//
// torch's CPU allocator returns big blocks to the OS on free, so every backward writes its gradient
// into fresh pages: the kernel page-faults and zeroes all of them first (for a 500 MB gradient that
// costs more than computing it). A training loop frees last step's gradient before the next backward,
// so keeping a few freed blocks mapped lets the next gradient land in pages that are already there.
// Bounded by LOSSFUSE_CPU_CACHE_MB (default 2048; 0 turns the cache off); lossfuse.empty_cache()
// releases everything.
#include <ATen/ops/from_blob.h>

#include <cstdlib>
#include <mutex>
#include <vector>

#include "tensor_utils.h"

namespace lossfuse {

namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kMinCachedBytes = size_t(8) << 20;  // smaller buffers are cheap to fault in

struct Cache {
  std::mutex mu;
  std::vector<std::pair<void*, size_t>> free_blocks;
  size_t cached = 0;
  size_t limit;
  Cache() {
    const char* env = std::getenv("LOSSFUSE_CPU_CACHE_MB");
    limit = (env ? size_t(std::strtoull(env, nullptr, 10)) : size_t(2048)) << 20;
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: tensors may outlive static destructors
  return *c;
}

void give_back(void* p, size_t bytes) {
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> g(c.mu);
    if (c.cached + bytes <= c.limit) {
      c.free_blocks.emplace_back(p, bytes);
      c.cached += bytes;
      return;
    }
  }
  std::free(p);
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = size_t(numel) * at::elementSize(at::typeMetaToScalarType(opts.dtype()));
  Cache& c = cache();
  if (nbytes < kMinCachedBytes || c.limit == 0) {
    at::Tensor out = at::empty(sizes, opts);
    advise_hugepages(out.data_ptr(), out.nbytes());
    return out;
  }
  const size_t bytes = (nbytes + kHuge - 1) / kHuge * kHuge;
  void* p = nullptr;
  size_t got = 0;
  {
    std::lock_guard<std::mutex> g(c.mu);
    // Best fit, and never more than a quarter too big: a small request must not pin a huge block.
    size_t best = c.free_blocks.size();
    for (size_t i = 0; i < c.free_blocks.size(); ++i) {
      const size_t b = c.free_blocks[i].second;
      if (b >= bytes && b <= bytes + bytes / 4 && (best == c.free_blocks.size() || b < c.free_blocks[best].second))
        best = i;
    }
    if (best != c.free_blocks.size()) {
      p = c.free_blocks[best].first;
      got = c.free_blocks[best].second;
      c.free_blocks.erase(c.free_blocks.begin() + long(best));
      c.cached -= got;
    }
  }
  if (!p) {
    p = std::aligned_alloc(kHuge, bytes);
    TORCH_CHECK(p, "lossfuse: out of memory allocating ", bytes, " bytes");
    advise_hugepages(p, bytes);
    got = bytes;
  }
  return at::from_blob(p, sizes, [got](void* q) { give_back(q, got); }, opts);
}

size_t cache_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  return c.cached;
}

void empty_cache() {
  Cache& c = cache();
  std::vector<std::pair<void*, size_t>> blocks;
  {
    std::lock_guard<std::mutex> g(c.mu);
    blocks.swap(c.free_blocks);
    c.cached = 0;
  }
  for (auto& b : blocks) std::free(b.first);
}

void set_cache_limit(size_t bytes) {
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> g(c.mu);
    c.limit = bytes;
  }
  if (bytes == 0) empty_cache();
}

size_t cache_limit() {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  return c.limit;
}

}  // namespace lossfuse
