// Exact k-smallest selection on CPU: the XLA FFI handler behind jprune/_cpu.py.
//
// A *leaf* is a float32, bfloat16 or float16 array (key: the bits of |x| as a float32, so leaves of
// mixed float dtypes rank on one scale; NaN above inf) or a uint32 key array, with an optional bool
// mask of candidates (non-candidates get the sentinel key 0xFFFFFFFF, never chosen). Real keys are
// below 2^31. A *group* of leaves loses exactly its k smallest keys, ties broken by flat index
// through the group's leaves in order, lowest first (jprune/_select.py, same rule).
//
// Per group, a histogram of the high 16 key bits finds the bucket holding the k-th key. Then:
// - a small bucket (the usual case): one pass writes the keep mask of every entry outside it
//   (kept above, pruned below) and gathers the bucket's few keys with their positions; the k-th key
//   is found among those, and their masks are written last, ties in flat order;
// - a large bucket (ties: after `remove`, half a leaf can be exact zeros): no gathering. The k-th key
//   t is exact zero if the zeros the histogram pass counted (per chunk) reach it; else a histogram
//   of the low 16 bits inside the bucket finds t and a counting pass finds its ties per chunk (a
//   group on one thread counts them as it writes). Then one pass writes every mask, each chunk
//   knowing how many of its ties come first in flat order.
// Groups of at most 2^14 entries skip the histogram and gather every key. Work is split over XLA's
// intra-op thread pool: chunks of one group (with per-thread histograms), or whole groups when
// there are several.
//
// Errors: no C++ exception leaves the handler (an allocation failure, here or in a pool task,
// becomes an ffi::Error, i.e. a Python exception); XLA's FFI versioning is described in setup.py.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <numeric>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__x86_64__) && defined(__GNUC__)
#define JPRUNE_AVX512 1  // compiled in; used when the CPU has it (HasAvx512)
#include <immintrin.h>
#endif

#ifndef JPRUNE_JAXLIB_VERSION  // set by setup.py: the jaxlib whose FFI headers built this file
#define JPRUNE_JAXLIB_VERSION "unknown"
#endif

namespace {

constexpr uint32_t kSentinel = 0xFFFFFFFFu;
constexpr int64_t kBins = 1 << 16;
constexpr int64_t kWays = 2;         // histograms filled in turn (see HistogramOf)
constexpr int64_t kSlots = kBins * kWays;
constexpr int64_t kChunk = 1 << 18;  // entries per work item
constexpr int64_t kSmall = 1 << 14;  // groups up to this size skip the histogram
constexpr int64_t kGatherShare = 64;  // gather a bucket of at most total / kGatherShare entries

// How a leaf's entries become keys.
enum class Kind : uint8_t { kF32, kU32, kBF16, kF16 };

// Calls f(std::integral_constant<Kind, K>{}) for `kind`: the one dispatch from a leaf's runtime
// kind to the pass templated on it.
template <class F>
inline decltype(auto) WithKind(Kind kind, F&& f) {
  switch (kind) {
    case Kind::kU32:
      return f(std::integral_constant<Kind, Kind::kU32>{});
    case Kind::kBF16:
      return f(std::integral_constant<Kind, Kind::kBF16>{});
    case Kind::kF16:
      return f(std::integral_constant<Kind, Kind::kF16>{});
    case Kind::kF32:
      break;
  }
  return f(std::integral_constant<Kind, Kind::kF32>{});
}

// The float32 key (bits of |x|) of a float16 value as XLA converts it: normal values rebias their
// exponent, subnormals become normal float32s (integer arithmetic only: no FTZ/DAZ mode can flush
// them), and a NaN keeps its payload with the quiet bit set (XLA's convert quiets a signaling NaN;
// numpy's astype does not, so numpy's keys differ for those 1022 bit patterns only).
inline uint32_t F16Key(uint32_t h) {
  const uint32_t a = h & 0x7FFFu;
  const uint32_t e = a >> 10;
  if (e == 0x1F) return ((a << 13) + (224u << 23)) | ((a & 0x3FFu) ? 0x00400000u : 0u);
  if (e != 0) return (a << 13) + (112u << 23);
  if (a == 0) return 0;
  const float f = static_cast<float>(a);  // exact: a < 2^10
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits - (24u << 23);  // a * 2^-24
}

template <Kind K>
inline uint32_t KeyAt(const void* data, int64_t i) {
  if constexpr (K == Kind::kF32) return static_cast<const uint32_t*>(data)[i] & 0x7FFFFFFFu;
  if constexpr (K == Kind::kU32) return static_cast<const uint32_t*>(data)[i];
  if constexpr (K == Kind::kBF16) return (static_cast<uint32_t>(static_cast<const uint16_t*>(data)[i]) & 0x7FFFu) << 16;
  if constexpr (K == Kind::kF16) return F16Key(static_cast<const uint16_t*>(data)[i]);
}

struct Leaf {
  const void* data;  // float32/uint32 or 16-bit float bit patterns
  const bool* mask;  // candidates; nullptr: every entry is one
  bool* keep;        // the result
  int64_t n;
  Kind kind;
};

struct Chunk {
  const Leaf* leaf;
  int64_t begin, end;
};

// Calls f(i, key) for the entries of a chunk.
template <Kind K, class F>
inline void ForKeysOf(const Chunk& c, F&& f) {
  const void* data = c.leaf->data;  // locals: stores through f cannot alias them
  const bool* mask = c.leaf->mask;
  const int64_t end = c.end;
  if (mask) {
    for (int64_t i = c.begin; i < end; ++i) f(i, mask[i] ? KeyAt<K>(data, i) : kSentinel);
  } else {
    for (int64_t i = c.begin; i < end; ++i) f(i, KeyAt<K>(data, i));
  }
}

template <class F>
inline void ForKeys(const Chunk& c, F&& f) {
  return WithKind(c.leaf->kind, [&](auto k) { return ForKeysOf<decltype(k)::value>(c, f); });
}

// Test hook, the call's `fault` attribute (0 in every real call): 1 throws std::bad_alloc on the
// calling thread, 2 in every work item, pool tasks included (ParallelFor).
thread_local int64_t t_fault = 0;

// Runs f(item, slot) for items [0, n) on up to `workers` threads: this one (slot 0) and pool tasks
// (slots 1..). Items are claimed from a shared counter, so a pool task that starts late, or never,
// costs nothing; this thread returns once every claimed item is done. An exception in any item is
// caught where it happens (it must not unwind a pool thread) and rethrown here once all are done.
template <class F>
void ParallelFor(ffi::ThreadPool* pool, int workers, int64_t n, const F& f) {
  const int64_t fault = t_fault;
  if (pool == nullptr || workers <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) {
      if (fault == 2) throw std::bad_alloc();
      f(i, 0);
    }
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<int> slot{1};
    std::atomic<bool> failed{false};
    std::exception_ptr error;  // the first one, written by whoever set `failed`
  };
  auto state = std::make_shared<State>();
  const F* fn = &f;  // only dereferenced for claimed items, while this frame waits for them
  auto work = [state, n, fn, fault](int slot) {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      try {
        if (fault == 2) throw std::bad_alloc();
        if (!state->failed.load(std::memory_order_relaxed)) (*fn)(i, slot);
      } catch (...) {
        if (!state->failed.exchange(true)) state->error = std::current_exception();
      }
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  try {
    for (int w = 1; w < workers && w < n; ++w) {
      pool->Schedule([state, work] { work(state->slot.fetch_add(1)); });
    }
  } catch (...) {  // fewer helpers (no memory for a task): this thread claims what is left
  }
  work(0);
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  if (state->failed.load()) std::rethrow_exception(state->error);
}

// A uint32 buffer that is not zero-filled when it grows, reused across calls: fresh large
// allocations are fresh mmaps, whose page faults cost more than a pass over a leaf.
class Scratch {
  static constexpr size_t kKept = kSlots;  // larger buffers are freed, not kept

 public:
  Scratch() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!free_.empty()) {
      buf_ = std::move(free_.back().first);
      cap_ = free_.back().second;
      free_.pop_back();
    }
  }
  ~Scratch() {
    std::lock_guard<std::mutex> lock(mu_);
    if (buf_ && cap_ <= kKept && free_.size() < 128) {
      try {
        free_.emplace_back(std::move(buf_), cap_);
      } catch (...) {  // no room to keep it: just free it
      }
    }
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  Scratch(Scratch&& other) noexcept : buf_(std::move(other.buf_)), cap_(other.cap_), size(other.size) {
    other.cap_ = other.size = 0;
  }
  uint32_t* data() { return buf_.get(); }
  const uint32_t* begin() const { return buf_.get(); }
  const uint32_t* end() const { return buf_.get() + size; }
  void Reserve(size_t n) {  // keeps the first `size` entries
    if (n <= cap_) return;
    const size_t cap = std::max(n, 2 * cap_);
    std::unique_ptr<uint32_t[]> bigger(new uint32_t[cap]);
    std::copy(begin(), end(), bigger.get());
    buf_ = std::move(bigger);
    cap_ = cap;
  }

 private:
  std::unique_ptr<uint32_t[]> buf_;
  size_t cap_ = 0;

 public:
  size_t size = 0;

 private:
  static inline std::mutex mu_;
  static inline std::vector<std::pair<std::unique_ptr<uint32_t[]>, size_t>> free_;
};

std::vector<Chunk> Chunks(const std::vector<Leaf*>& leaves) {
  std::vector<Chunk> chunks;
  for (const Leaf* l : leaves) {
    for (int64_t b = 0; b < l->n; b += kChunk) chunks.push_back({l, b, std::min(l->n, b + kChunk)});
  }
  return chunks;
}

// What one pass over a chunk leaves to decide: the keys in the bracket [lo, hi] and their offsets
// in the chunk, in order.
struct Undecided {
  Scratch keys, offsets;
  int64_t below = 0;  // keys under lo
};

// One pass over a chunk for a bracket [lo, hi] of keys: keeps the candidates above hi, prunes the
// keys below lo (and counts them), and gathers the keys in the bracket. Blocks of 64 let the
// compiler vectorize the keep mask and the counts.
void Split(const Chunk& c, uint32_t lo, uint32_t hi, Undecided& out) {
  bool* keep = c.leaf->keep;
  const uint32_t span = hi - lo;
  for (int64_t b = c.begin; b < c.end; b += 64) {
    const Chunk block{c.leaf, b, std::min(c.end, b + 64)};
    int32_t below = 0, hits = 0;
    ForKeys(block, [keep, &below, &hits, lo, hi, span](int64_t i, uint32_t key) {
      keep[i] = (key > hi) & (key != kSentinel);
      below += key < lo;
      hits += key - lo <= span;  // unsigned: false below lo
    });
    out.below += below;
    if (hits == 0) continue;
    out.keys.Reserve(out.keys.size + 64);
    out.offsets.Reserve(out.offsets.size + 64);
    uint32_t* k = out.keys.data();
    uint32_t* o = out.offsets.data();
    size_t n = out.keys.size;
    const uint32_t begin = static_cast<uint32_t>(c.begin);
    ForKeys(block, [k, o, &n, lo, span, begin](int64_t i, uint32_t key) {
      k[n] = key;
      o[n] = static_cast<uint32_t>(i) - begin;
      n += key - lo <= span;
    });
    out.keys.size = out.offsets.size = n;
  }
}

// One pass that writes every mask of a chunk once the k-th key t is known: kept above t, pruned
// below, and of the ties at t the first `prune` of the chunk (in flat order) pruned, the rest kept.
// Blocks wholly on one side of the tie boundary vectorize; the block that holds it carries a
// running count (still no branch per entry). Returns how many of `prune` are left for later chunks.
int64_t Write(const Chunk& c, uint32_t t, int64_t prune) {
  bool* keep = c.leaf->keep;
  for (int64_t b = c.begin; b < c.end; b += 64) {
    const Chunk block{c.leaf, b, std::min(c.end, b + 64)};
    if (prune <= 0 || prune >= 64) {
      const bool ties_kept = prune <= 0;
      int32_t n = 0;
      ForKeys(block, [keep, &n, t, ties_kept](int64_t i, uint32_t key) {
        keep[i] = ((key > t) | ((key == t) & ties_kept)) & (key != kSentinel);
        n += key == t;
      });
      if (!ties_kept) prune -= n;
    } else {
      ForKeys(block, [keep, &prune, t](int64_t i, uint32_t key) {
        const bool tie = key == t;
        keep[i] = ((key > t) | (tie & (prune <= 0))) & (key != kSentinel);
        prune -= tie;
      });
    }
  }
  return std::max<int64_t>(prune, 0);
}

// The number of keys equal to t in a chunk.
int64_t CountTies(const Chunk& c, uint32_t t) {
  int64_t n = 0;
  ForKeys(c, [&n, t](int64_t, uint32_t key) { n += key == t; });
  return n;
}

// Histograms of kSlots slots: kWays histograms of kBins bins, one after the other.
// Consecutive entries go to different histograms (entry i to i % kWays): when many keys share a bin
// (after `remove`, half a leaf can be zeros), an increment then need not wait for the previous one
// to be stored. A bin's count is the sum over the ways (Group::Sum). `add(way, i, key)` adds entry i.
template <Kind K, class Add>
inline void HistogramLoop(const Chunk& c, Add add) {
  static_assert(kWays == 2, "unrolled by two, four entries a step");
  const void* data = c.leaf->data;  // locals: the stores to h cannot change them
  const bool* mask = c.leaf->mask;
  int64_t i = c.begin;
  const int64_t end = c.end;
  if (mask) {
    for (; i + 4 <= end; i += 4) {
      const uint32_t k0 = mask[i] ? KeyAt<K>(data, i) : kSentinel;
      const uint32_t k1 = mask[i + 1] ? KeyAt<K>(data, i + 1) : kSentinel;
      const uint32_t k2 = mask[i + 2] ? KeyAt<K>(data, i + 2) : kSentinel;
      const uint32_t k3 = mask[i + 3] ? KeyAt<K>(data, i + 3) : kSentinel;
      add(0, i, k0), add(1, i + 1, k1), add(0, i + 2, k2), add(1, i + 3, k3);
    }
    for (; i < end; ++i) add(0, i, mask[i] ? KeyAt<K>(data, i) : kSentinel);
  } else {
    for (; i + 4 <= end; i += 4) {
      const uint32_t k0 = KeyAt<K>(data, i), k1 = KeyAt<K>(data, i + 1);
      const uint32_t k2 = KeyAt<K>(data, i + 2), k3 = KeyAt<K>(data, i + 3);
      add(0, i, k0), add(1, i + 1, k1), add(0, i + 2, k2), add(1, i + 3, k3);
    }
    for (; i < end; ++i) add(0, i, KeyAt<K>(data, i));
  }
}

// Adds the high 16 bits of a chunk's keys to such a histogram; returns the number of exact zeros.
template <Kind K>
int64_t HistogramOf(const Chunk& c, uint32_t* h) {
  int64_t zeros = 0;
  HistogramLoop<K>(c, [h, &zeros](uint32_t way, int64_t, uint32_t key) {
    ++h[way * kBins + (key >> 16)];
    zeros += key == 0;
  });
  return zeros;
}

// Adds the low 16 bits of the chunk's keys in `bucket` to such a histogram. The bucket can hold
// any share of the keys, so they are first appended to a small buffer without a branch, block by
// block, and only those are counted.
constexpr int64_t kLowBlock = 1024;

// Adds n buffered keys' low 16 bits to a histogram, kWays at a time.
inline void CountLow(const uint32_t* keys, int64_t n, uint32_t* h) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    ++h[keys[j] & 0xFFFF];
    ++h[kBins + (keys[j + 1] & 0xFFFF)];
    ++h[keys[j + 2] & 0xFFFF];
    ++h[kBins + (keys[j + 3] & 0xFFFF)];
  }
  for (; j < n; ++j) ++h[keys[j] & 0xFFFF];
}

template <Kind K>
void HistogramLowOf(const Chunk& c, uint32_t bucket, uint32_t* h) {
  uint32_t keys[kLowBlock];
  for (int64_t b = c.begin; b < c.end; b += kLowBlock) {
    int64_t n = 0;
    ForKeysOf<K>({c.leaf, b, std::min(c.end, b + kLowBlock)}, [&keys, &n, bucket](int64_t, uint32_t key) {
      keys[n] = key;
      n += (key >> 16) == bucket;
    });
    CountLow(keys, n, h);
  }
}

int64_t Histogram(const Chunk& c, uint32_t* h) {
  return WithKind(c.leaf->kind, [&](auto k) { return HistogramOf<decltype(k)::value>(c, h); });
}

void HistogramLow(const Chunk& c, uint32_t bucket, uint32_t* h) {
  return WithKind(c.leaf->kind, [&](auto k) { return HistogramLowOf<decltype(k)::value>(c, bucket, h); });
}

#ifdef JPRUNE_AVX512
#define JPRUNE_TARGET __attribute__((target("avx512f")))

// 16 keys from entry i: the same keys as KeyAt, candidates masked to the sentinel.
template <Kind K>
JPRUNE_TARGET inline __m512i Load16(const Leaf& l, int64_t i) {
  const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF);
  __m512i key;
  if constexpr (K == Kind::kF32 || K == Kind::kU32) {
    key = _mm512_loadu_si512(static_cast<const uint32_t*>(l.data) + i);
    if constexpr (K == Kind::kF32) key = _mm512_and_si512(key, abs);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(l.data) + i));
    const __m512i a = _mm512_and_si512(_mm512_cvtepu16_epi32(h), _mm512_set1_epi32(0x7FFF));
    if constexpr (K == Kind::kBF16) {
      key = _mm512_slli_epi32(a, 16);
    } else {  // F16Key, lane by lane
      const __m512i shifted = _mm512_slli_epi32(a, 13);
      const __m512i e = _mm512_srli_epi32(a, 10);
      key = _mm512_add_epi32(shifted, _mm512_set1_epi32(112 << 23));
      const __mmask16 special = _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(0x1F));
      key = _mm512_mask_add_epi32(key, special, shifted, _mm512_set1_epi32(static_cast<int>(224u << 23)));
      const __mmask16 nan = _mm512_mask_test_epi32_mask(special, a, _mm512_set1_epi32(0x3FF));
      key = _mm512_mask_or_epi32(key, nan, key, _mm512_set1_epi32(0x00400000));  // quiet, as XLA
      const __mmask16 sub = _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512());
      const __mmask16 nonzero = _mm512_test_epi32_mask(a, a);
      const __m512i f = _mm512_castps_si512(_mm512_cvtepi32_ps(a));  // exact: a < 2^10 here
      key = _mm512_mask_mov_epi32(key, sub, _mm512_setzero_si512());
      key = _mm512_mask_sub_epi32(key, sub & nonzero, f, _mm512_set1_epi32(24 << 23));
    }
  }
  if (l.mask) {
    const __m128i m8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(l.mask + i));
    const __m512i m = _mm512_cvtepu8_epi32(m8);
    key = _mm512_mask_mov_epi32(_mm512_set1_epi32(-1), _mm512_test_epi32_mask(m, m), key);
  }
  return key;
}

JPRUNE_TARGET inline void Store16(bool* keep, __mmask16 kept) {
  const __m128i kept8 = _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(kept, _mm512_set1_epi32(1)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(keep), kept8);
}

// Split with AVX-512F intrinsics: 16 keys a step, the bracketed ones compress-stored (about 15 %
// faster overall than the compiler's own AVX-512 vectorization of Split).
template <Kind K>
JPRUNE_TARGET void SplitAvx512(const Chunk& c, uint32_t lo, uint32_t hi, Undecided& out) {
  const Leaf& leaf = *c.leaf;
  bool* keep = leaf.keep;
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo));
  const __m512i vhi = _mm512_set1_epi32(static_cast<int>(hi));
  const __m512i span = _mm512_set1_epi32(static_cast<int>(hi - lo));
  const __m512i sentinel = _mm512_set1_epi32(-1);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t i = c.begin, below = 0;
  for (; i + 16 <= c.end; i += 16) {
    const __m512i key = Load16<K>(leaf, i);
    const __mmask16 above = _mm512_cmpgt_epu32_mask(key, vhi);
    Store16(keep + i, _mm512_mask_cmpneq_epu32_mask(above, key, sentinel));
    below += __builtin_popcount(_mm512_cmplt_epu32_mask(key, vlo));
    const __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(key, vlo), span);
    if (in) {
      out.keys.Reserve(out.keys.size + 16);
      out.offsets.Reserve(out.offsets.size + 16);
      const __m512i offset = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(i - c.begin)));
      _mm512_mask_compressstoreu_epi32(out.keys.data() + out.keys.size, in, key);
      _mm512_mask_compressstoreu_epi32(out.offsets.data() + out.offsets.size, in, offset);
      out.keys.size = out.offsets.size = out.keys.size + __builtin_popcount(in);
    }
  }
  out.below += below;
  // The last few entries: offsets from the chunk's start, as above.
  const size_t before = out.keys.size;
  Split({c.leaf, i, c.end}, lo, hi, out);
  const uint32_t shift = static_cast<uint32_t>(i - c.begin);
  for (size_t j = before; j < out.offsets.size; ++j) out.offsets.data()[j] += shift;
}

// Write with AVX-512F intrinsics.
template <Kind K>
JPRUNE_TARGET int64_t WriteAvx512(const Chunk& c, uint32_t t, int64_t prune) {
  const Leaf& leaf = *c.leaf;
  bool* keep = leaf.keep;
  const __m512i vt = _mm512_set1_epi32(static_cast<int>(t));
  const __m512i sentinel = _mm512_set1_epi32(-1);
  int64_t i = c.begin;
  for (; i + 16 <= c.end; i += 16) {
    const __m512i key = Load16<K>(leaf, i);
    const __mmask16 above = _mm512_mask_cmpneq_epu32_mask(_mm512_cmpgt_epu32_mask(key, vt), key, sentinel);
    __mmask16 ties = _mm512_cmpeq_epi32_mask(key, vt);  // t is a real key, never the sentinel
    if (prune > 0) {
      const int n = __builtin_popcount(ties);
      if (prune >= n) {
        ties = 0;
      } else {
        for (int64_t r = prune; r > 0; --r) ties &= ties - 1;  // drop the first `prune`
      }
      prune -= std::min<int64_t>(prune, n);
    }
    Store16(keep + i, above | ties);
  }
  return Write({c.leaf, i, c.end}, t, prune);
}

// HistogramLow with AVX-512F: the bucket's keys compress-stored 16 at a time.
template <Kind K>
JPRUNE_TARGET void HistogramLowAvx512(const Chunk& c, uint32_t bucket, uint32_t* h) {
  const __m512i vb = _mm512_set1_epi32(static_cast<int>(bucket));
  uint32_t keys[kLowBlock + 16];  // a full vector is stored at keys + n
  int64_t i = c.begin;
  while (i + 16 <= c.end) {
    int64_t n = 0;
    for (const int64_t stop = std::min(c.end, i + kLowBlock); i + 16 <= stop; i += 16) {
      const __m512i key = Load16<K>(*c.leaf, i);
      const __mmask16 in = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(key, 16), vb);
      // Compressed in a register, then stored whole: a compress-store to memory is slow.
      _mm512_storeu_si512(keys + n, _mm512_maskz_compress_epi32(in, key));
      n += __builtin_popcount(in);
    }
    CountLow(keys, n, h);
  }
  HistogramLow({c.leaf, i, c.end}, bucket, h);
}

template <Kind K>
JPRUNE_TARGET int64_t CountTiesAvx512(const Chunk& c, uint32_t t) {
  const __m512i vt = _mm512_set1_epi32(static_cast<int>(t));
  int64_t i = c.begin, n = 0;
  for (; i + 16 <= c.end; i += 16) n += __builtin_popcount(_mm512_cmpeq_epi32_mask(Load16<K>(*c.leaf, i), vt));
  return n + CountTies({c.leaf, i, c.end}, t);
}

void SplitFast(const Chunk& c, uint32_t lo, uint32_t hi, Undecided& out) {
  return WithKind(c.leaf->kind, [&](auto k) { return SplitAvx512<decltype(k)::value>(c, lo, hi, out); });
}

int64_t WriteFast(const Chunk& c, uint32_t t, int64_t prune) {
  return WithKind(c.leaf->kind, [&](auto k) { return WriteAvx512<decltype(k)::value>(c, t, prune); });
}

void HistogramLowFast(const Chunk& c, uint32_t bucket, uint32_t* h) {
  return WithKind(c.leaf->kind, [&](auto k) { return HistogramLowAvx512<decltype(k)::value>(c, bucket, h); });
}

int64_t CountTiesFast(const Chunk& c, uint32_t t) {
  return WithKind(c.leaf->kind, [&](auto k) { return CountTiesAvx512<decltype(k)::value>(c, t); });
}
#endif

bool HasAvx512() {
#ifdef JPRUNE_AVX512
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

class Group {
 public:
  // `simd`: use AVX-512 where the CPU has it (the masks are the same either way).
  Group(std::vector<Leaf*> leaves, ffi::ThreadPool* pool, int workers, bool simd)
      : leaves_(std::move(leaves)), chunks_(Chunks(leaves_)), pool_(pool), avx512_(simd && HasAvx512()) {
    for (const Leaf* l : leaves_) total_ += l->n;
    const int64_t nc = static_cast<int64_t>(chunks_.size());
    workers_ = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(workers, nc)));
  }

  // Prunes the k smallest keys, ties by flat index (k clamped to the candidates).
  void Prune(int64_t k) {
    k = std::max<int64_t>(k, 0);
    if (total_ <= kSmall) {  // a small group brackets every key
      int64_t below = 0, bracketed = 0;
      SplitAll(0, kMaxKey, &below, &bracketed);
      k = std::min(k, bracketed);
      return Decide(k > 0 ? Rank(k - below - 1) : Kth{});
    }
    if (k == 0) return WriteAll(Kth{0, 0}, nullptr);  // keep every candidate
    const Bucket b = FindBucket(k);
    if (b.k == 0) return WriteAll(Kth{0, 0}, nullptr);  // no candidates
    const int64_t r = b.k - b.below;  // the k-th key is the r-th (from 1) of the bucket
    if (b.count * kGatherShare <= total_) {  // few keys in the bucket: gather them
      int64_t below = 0, bracketed = 0;
      SplitAll(b.bucket << 16, (b.bucket << 16) | 0xFFFF, &below, &bracketed);
      return Decide(Rank(r - 1));
    }
    // A large bucket: find the k-th key t without gathering, count its ties per chunk, then write
    // every mask in one pass.
    if (b.bucket == 0 && zeros_.back() >= r) return WriteAll(Kth{0, r}, &zeros_);  // as after `remove`
    const Kth kth = Low(b.bucket, r);
    if (workers_ == 1) return WriteAll(kth, nullptr);  // chunks in order: ties counted as written
    std::vector<int64_t> ties(chunks_.size() + 1, 0);
    ForChunks([&](int64_t c, int) {
#ifdef JPRUNE_AVX512
      if (avx512_) {
        ties[c] = CountTiesFast(chunks_[c], kth.t);
        return;
      }
#endif
      ties[c] = CountTies(chunks_[c], kth.t);
    });
    WriteAll(kth, &ties);
  }

 private:
  static constexpr uint32_t kMaxKey = 0x7FFFFFFF;  // real keys are at most this

  // The k-th smallest key t; of the keys equal to t, the first `take` (in flat order) are pruned.
  struct Kth {
    uint32_t t = 0;
    int64_t take = 0;
  };

  struct Bucket {
    int64_t k = 0;       // k clamped to the candidates
    uint32_t bucket = 0;  // the high 16 bits of the k-th key
    int64_t below = 0;    // keys in lower buckets
    int64_t count = 0;    // keys in the bucket
  };

  template <class F>
  void ForChunks(const F& f) {
    ParallelFor(pool_, workers_, static_cast<int64_t>(chunks_.size()), f);
  }

  // Per-worker histograms of kSlots slots, zeroed. For the high 16 key bits (`high`), only the bins a
  // key can reach: real keys are below 2^31 (bins up to 0x7FFF) and the sentinel's bin is the last
  // (half the zeroing, which matters for groups not much larger than a histogram).
  std::vector<Scratch> Histograms(bool high) {
    const int64_t reach = high ? (kMaxKey >> 16) + 1 : kBins;
    std::vector<Scratch> hist;
    hist.reserve(workers_);
    for (int w = 0; w < workers_; ++w) {
      hist.emplace_back();
      Scratch& h = hist.back();
      h.Reserve(kSlots);
      for (int64_t way = 0; way < kWays; ++way) {
        uint32_t* bins = h.data() + way * kBins;
        std::fill(bins, bins + reach, 0u);
        bins[kBins - 1] = 0;
      }
    }
    return hist;
  }

  // Adds every worker's ways into the first way of the first histogram, for the bins [0, reach) and
  // the last one; returns those counts (a vectorized pass, instead of summing slots per bin).
  static const uint32_t* Merge(std::vector<Scratch>& hist, int64_t reach) {
    uint32_t* to = hist[0].data();
    for (size_t w = 0; w < hist.size(); ++w) {
      for (int64_t way = w == 0 ? 1 : 0; way < kWays; ++way) {
        const uint32_t* from = hist[w].data() + way * kBins;
        for (int64_t bin = 0; bin < reach; ++bin) to[bin] += from[bin];
        if (reach < kBins) to[kBins - 1] += from[kBins - 1];
      }
    }
    return to;
  }

  // The bucket of the k-th key, from a histogram of the high 16 key bits. Counts the exact zeros
  // too: per chunk in zeros_, and their total as its last entry.
  Bucket FindBucket(int64_t k) {
    std::vector<Scratch> hist = Histograms(/*high=*/true);
    zeros_.assign(chunks_.size() + 1, 0);
    ForChunks([&](int64_t c, int slot) { zeros_[c] = Histogram(chunks_[c], hist[slot].data()); });
    zeros_.back() = std::accumulate(zeros_.begin(), zeros_.end() - 1, int64_t{0});
    const uint32_t* counts = Merge(hist, (kMaxKey >> 16) + 1);
    Bucket b;
    const int64_t sentinels = counts[kBins - 1];  // the top bin holds only sentinels
    b.k = std::clamp<int64_t>(k, 0, total_ - sentinels);
    if (b.k == 0) return b;
    for (;; ++b.bucket) {
      b.count = counts[b.bucket];
      if (b.below + b.count >= b.k) break;
      b.below += b.count;
    }
    return b;
  }

  // The r-th key (from 1) of a bucket, from a histogram of the low 16 bits of its keys.
  Kth Low(uint32_t bucket, int64_t r) {
    std::vector<Scratch> hist = Histograms(/*high=*/false);
    ForChunks([&](int64_t c, int slot) {
#ifdef JPRUNE_AVX512
      if (avx512_) return HistogramLowFast(chunks_[c], bucket, hist[slot].data());
#endif
      HistogramLow(chunks_[c], bucket, hist[slot].data());
    });
    const uint32_t* counts = Merge(hist, kBins);
    int64_t less = 0;
    for (uint32_t low = 0;; ++low) {
      const int64_t n = counts[low];
      if (less + n >= r) return {(bucket << 16) | low, r - less};
      less += n;
    }
  }

  // Writes every mask for the k-th key, given the number of ties at t in each chunk (`ties`, one
  // per chunk and maybe one more): a chunk prunes those of its ties that are among the first `take`
  // of the group. Without `ties` (nullptr), one worker writes the chunks in order and carries the
  // count; or none is pruned (take 0).
  void WriteAll(Kth kth, const std::vector<int64_t>* ties) {
    auto write = [&](int64_t c, int64_t prune) {
#ifdef JPRUNE_AVX512
      if (avx512_) return WriteFast(chunks_[c], kth.t, prune);
#endif
      return Write(chunks_[c], kth.t, prune);
    };
    if (ties == nullptr && kth.take > 0) {
      int64_t prune = kth.take;
      for (int64_t c = 0; c < static_cast<int64_t>(chunks_.size()); ++c) prune = write(c, prune);
      return;
    }
    std::vector<int64_t> prune(chunks_.size(), 0);
    int64_t before = 0;  // ties in the chunks before this one
    for (size_t c = 0; ties != nullptr && c < chunks_.size(); ++c) {
      prune[c] = std::clamp<int64_t>(kth.take - before, 0, (*ties)[c]);
      before += (*ties)[c];
    }
    ForChunks([&](int64_t c, int) { write(c, prune[c]); });
  }

  void SplitAll(uint32_t lo, uint32_t hi, int64_t* below, int64_t* bracketed) {
    parts_.resize(chunks_.size());
    ForChunks([&](int64_t c, int) {
      Undecided& part = parts_[c];
      part.below = 0;
      part.keys.size = part.offsets.size = 0;
#ifdef JPRUNE_AVX512
      if (avx512_) return SplitFast(chunks_[c], lo, hi, part);
#endif
      Split(chunks_[c], lo, hi, part);
    });
    *below = *bracketed = 0;
    for (const Undecided& part : parts_) {
      *below += part.below;
      *bracketed += static_cast<int64_t>(part.keys.size);
    }
  }

  // The r-th smallest (0-based) bracketed key: a 4096-bin histogram of the bracketed keys, then
  // nth_element within the bin holding it.
  Kth Rank(int64_t r) {
    uint32_t lo = kSentinel, hi = 0;
    for (const Undecided& part : parts_) {
      for (uint32_t key : part.keys) lo = std::min(lo, key), hi = std::max(hi, key);
    }
    int shift = 0;
    while (((hi - lo) >> shift) >= 4096) ++shift;
    std::vector<int64_t> hist(4096, 0);
    for (const Undecided& part : parts_) {
      for (uint32_t key : part.keys) ++hist[(key - lo) >> shift];
    }
    int64_t less = 0;
    uint32_t bin = 0;
    while (less + hist[bin] <= r) less += hist[bin++];
    std::vector<uint32_t> in_bin;
    for (const Undecided& part : parts_) {
      for (uint32_t key : part.keys) {
        if (((key - lo) >> shift) == bin) in_bin.push_back(key);
      }
    }
    const int64_t rank = r - less;
    std::nth_element(in_bin.begin(), in_bin.begin() + rank, in_bin.end());
    Kth kth;
    kth.t = in_bin[rank];
    less += std::count_if(in_bin.begin(), in_bin.end(), [t = kth.t](uint32_t x) { return x < t; });
    kth.take = r + 1 - less;
    return kth;
  }

  // Writes the bracketed entries' masks: below t pruned, above kept, the first `take` ties pruned.
  void Decide(Kth kth) {
    int64_t take = kth.take;
    for (size_t c = 0; c < chunks_.size(); ++c) {
      bool* keep = chunks_[c].leaf->keep + chunks_[c].begin;
      const Undecided& part = parts_[c];
      const uint32_t* keys = part.keys.begin();
      const uint32_t* offsets = part.offsets.begin();
      for (size_t j = 0; j < part.keys.size; ++j) {
        const uint32_t key = keys[j];
        const bool tie_kept = key == kth.t && take-- <= 0;
        keep[offsets[j]] = key > kth.t || tie_kept;
      }
    }
  }

  std::vector<Leaf*> leaves_;
  std::vector<Chunk> chunks_;
  std::vector<Undecided> parts_;
  std::vector<int64_t> zeros_;  // exact zeros per chunk, then their total (FindBucket)
  ffi::ThreadPool* pool_;
  bool avx512_;
  int workers_;
  int64_t total_ = 0;
};

// Args: k (int32, one per group), then one float32, bfloat16, float16 or uint32 array per leaf,
// then the masks of the leaves listed in `masked`. Rets: one bool array per leaf. `joint`: all
// leaves form one group; otherwise each leaf is its own group.
ffi::Error Select(ffi::ThreadPool& pool, ffi::Buffer<ffi::S32> ks, ffi::RemainingArgs args,
                  ffi::RemainingRets rets, bool joint, ffi::Span<const int64_t> masked, bool simd) {
  const size_t n_leaves = rets.size();
  if (args.size() != n_leaves + masked.size()) {
    return ffi::Error::InvalidArgument("jprune_select: wrong number of arguments");
  }
  std::vector<Leaf> leaves(n_leaves);
  for (size_t i = 0; i < n_leaves; ++i) {
    auto x = args.get<ffi::AnyBuffer>(i);
    auto keep = rets.get<ffi::AnyBuffer>(i);
    if (x.has_error()) return x.error();
    if (keep.has_error()) return keep.error();
    Kind kind;
    switch (x->element_type()) {
      case ffi::DataType::F32:
        kind = Kind::kF32;
        break;
      case ffi::DataType::U32:
        kind = Kind::kU32;
        break;
      case ffi::DataType::BF16:
        kind = Kind::kBF16;
        break;
      case ffi::DataType::F16:
        kind = Kind::kF16;
        break;
      default:
        return ffi::Error::InvalidArgument("jprune_select: leaves must be float32, bfloat16, float16 or uint32");
    }
    if ((*keep)->element_type() != ffi::DataType::PRED || (*keep)->element_count() != x->element_count()) {
      return ffi::Error::InvalidArgument("jprune_select: results must be bool arrays shaped like the leaves");
    }
    leaves[i] = {x->untyped_data(), nullptr, static_cast<bool*>((*keep)->untyped_data()),
                 static_cast<int64_t>(x->element_count()), kind};
  }
  for (size_t j = 0; j < masked.size(); ++j) {
    auto m = args.get<ffi::AnyBuffer>(n_leaves + j);
    if (m.has_error()) return m.error();
    const int64_t i = masked[j];
    if (i < 0 || i >= static_cast<int64_t>(n_leaves) || m->element_type() != ffi::DataType::PRED ||
        static_cast<int64_t>(m->element_count()) != leaves[i].n) {
      return ffi::Error::InvalidArgument("jprune_select: a mask does not match its leaf");
    }
    leaves[i].mask = static_cast<const bool*>(m->untyped_data());
  }
  const int64_t n_groups = joint ? 1 : static_cast<int64_t>(n_leaves);
  if (static_cast<int64_t>(ks.element_count()) != n_groups) {
    return ffi::Error::InvalidArgument("jprune_select: one k per group expected");
  }
  const int workers = static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
  if (joint || n_groups == 1) {
    std::vector<Leaf*> all;
    for (Leaf& l : leaves) all.push_back(&l);
    Group(all, &pool, workers, simd).Prune(n_groups ? ks.typed_data()[0] : 0);
    return ffi::Error::Success();
  }
  // Several groups: whole groups per thread, largest first.
  std::vector<int64_t> order(n_groups);
  for (int64_t g = 0; g < n_groups; ++g) order[g] = g;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return leaves[a].n > leaves[b].n; });
  ParallelFor(&pool, workers, n_groups, [&](int64_t i, int) {
    const int64_t g = order[i];
    Group({&leaves[g]}, nullptr, 1, simd).Prune(ks.typed_data()[g]);
  });
  return ffi::Error::Success();
}

// The handler's body: Select, with every C++ exception turned into an ffi::Error (none may unwind
// into XLA, which is built with another C++ runtime and may not catch it).
ffi::Error SelectImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> ks, ffi::RemainingArgs args,
                      ffi::RemainingRets rets, bool joint, ffi::Span<const int64_t> masked, bool simd,
                      int64_t fault) {
  t_fault = fault;
  try {
    if (fault == 1) throw std::bad_alloc();
    ffi::Error error = Select(pool, ks, args, rets, joint, masked, simd);
    t_fault = 0;
    return error;
  } catch (const std::bad_alloc&) {
    t_fault = 0;
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "jprune_select: out of memory (std::bad_alloc)");
  } catch (const std::exception& e) {
    t_fault = 0;
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jprune_select: ") + e.what());
  } catch (...) {
    t_fault = 0;
    return ffi::Error(ffi::ErrorCode::kInternal, "jprune_select: unknown C++ exception");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JprSelect, SelectImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<bool>("joint")
                                  .Attr<ffi::Span<const int64_t>>("masked")
                                  .Attr<bool>("simd")
                                  .Attr<int64_t>("fault"));

// The Python module: `select`, a capsule for jax.ffi.register_ffi_target, and what built it:
// `ffi_api_version` (the XLA FFI API version of the headers, which the handler reports to XLA when it
// is registered) and `jaxlib_version` (the jaxlib those headers came from).
static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu_select", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__cpu_select(void) {
  PyObject* m = PyModule_Create(&kModule);
  if (m == nullptr) return nullptr;
  PyObject* capsule = PyCapsule_New(reinterpret_cast<void*>(&JprSelect), nullptr, nullptr);
  if (capsule == nullptr || PyModule_AddObject(m, "select", capsule) < 0) {
    Py_XDECREF(capsule);
    Py_DECREF(m);
    return nullptr;
  }
  PyObject* version = Py_BuildValue("(ii)", XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  const int added = version == nullptr ? -1 : PyModule_AddObjectRef(m, "ffi_api_version", version);
  Py_XDECREF(version);
  if (added < 0 || PyModule_AddStringConstant(m, "jaxlib_version", JPRUNE_JAXLIB_VERSION) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
