// Exact k-smallest selection on CPU: the XLA FFI handler behind jprune/_cpu.py.
//
// A *leaf* is a float32 array (key: the bits of |x|, NaN above inf) or a uint32 key array, with an
// optional bool mask of candidates (non-candidates get the sentinel key 0xFFFFFFFF, never chosen).
// Real keys are below 2^31. A *group* of leaves loses exactly its k smallest keys, ties broken by
// flat index through the group's leaves in order, lowest first (jprune/_select.py, same rule).
//
// Two passes per group: a histogram of the high 16 key bits finds the bucket holding the k-th
// key; then one pass writes the keep mask of every entry outside that bucket (kept above it,
// pruned below) and gathers the bucket's few keys with their positions. The k-th key is found among
// those, and their masks are written last, ties in flat order. Groups of at most 2^14 entries
// skip the histogram and gather every key. Work is split over XLA's intra-op thread pool: chunks of
// one group (with per-thread histograms), or whole groups when there are several.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__x86_64__) && defined(__GNUC__)
#define JPRUNE_AVX512 1  // compiled in; used when the CPU has it (HasAvx512)
#include <immintrin.h>
#endif

namespace {

constexpr uint32_t kSentinel = 0xFFFFFFFFu;
constexpr int64_t kBins = 1 << 16;
constexpr int64_t kChunk = 1 << 18;  // entries per work item
constexpr int64_t kSmall = 1 << 14;  // groups up to this size skip the histogram

struct Leaf {
  const uint32_t* bits;  // float32 bit patterns, or uint32 keys
  const bool* mask;      // candidates; nullptr: every entry is one
  bool* keep;            // the result
  int64_t n;
  uint32_t clear;  // 0x7FFFFFFF takes |x| of a float; 0xFFFFFFFF leaves a key as it is
};

struct Chunk {
  const Leaf* leaf;
  int64_t begin, end;
};

// Calls f(i, key) for the entries of a chunk.
template <class F>
inline void ForKeys(const Chunk& c, F&& f) {
  const uint32_t* bits = c.leaf->bits;  // locals: stores through f cannot alias them
  const bool* mask = c.leaf->mask;
  const uint32_t clear = c.leaf->clear;
  const int64_t end = c.end;
  if (mask) {
    for (int64_t i = c.begin; i < end; ++i) f(i, mask[i] ? (bits[i] & clear) : kSentinel);
  } else {
    for (int64_t i = c.begin; i < end; ++i) f(i, bits[i] & clear);
  }
}

// Runs f(item, slot) for items [0, n) on up to `workers` threads: this one (slot 0) and pool tasks
// (slots 1..). Items are claimed from a shared counter, so a pool task that starts late, or never,
// costs nothing; this thread returns once every claimed item is done.
template <class F>
void ParallelFor(ffi::ThreadPool* pool, int workers, int64_t n, const F& f) {
  if (pool == nullptr || workers <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i, 0);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<int> slot{1};
  };
  auto state = std::make_shared<State>();
  const F* fn = &f;  // only dereferenced for claimed items, while this frame waits for them
  auto work = [state, n, fn](int slot) {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      (*fn)(i, slot);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int w = 1; w < workers && w < n; ++w) {
    pool->Schedule([state, work] { work(state->slot.fetch_add(1)); });
  }
  work(0);
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// A uint32 buffer that is not zero-filled when it grows, reused across calls: fresh large
// allocations are fresh mmaps, whose page faults cost more than a pass over a leaf.
class Scratch {
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
    if (buf_ && cap_ <= (1 << 18) && free_.size() < 128) free_.emplace_back(std::move(buf_), cap_);
  }
  uint32_t* data() { return buf_.get(); }
  const uint32_t* begin() const { return buf_.get(); }
  const uint32_t* end() const { return buf_.get() + size; }
  void Reserve(size_t n) {  // keeps the first `size` entries
    if (n <= cap_) return;
    cap_ = std::max(n, 2 * cap_);
    std::unique_ptr<uint32_t[]> bigger(new uint32_t[cap_]);
    std::copy(begin(), end(), bigger.get());
    buf_ = std::move(bigger);
  }
  size_t size = 0;

 private:
  std::unique_ptr<uint32_t[]> buf_;
  size_t cap_ = 0;
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

#ifdef JPRUNE_AVX512
// Split with AVX-512F intrinsics: 16 keys a step, the bracketed ones compress-stored (about 15 %
// faster overall than the compiler's own AVX-512 vectorization of Split).
__attribute__((target("avx512f"))) void SplitAvx512(const Chunk& c, uint32_t lo, uint32_t hi,
                                                     Undecided& out) {
  const uint32_t* bits = c.leaf->bits;
  const bool* mask = c.leaf->mask;
  bool* keep = c.leaf->keep;
  const __m512i clear = _mm512_set1_epi32(static_cast<int>(c.leaf->clear));
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo));
  const __m512i vhi = _mm512_set1_epi32(static_cast<int>(hi));
  const __m512i span = _mm512_set1_epi32(static_cast<int>(hi - lo));
  const __m512i sentinel = _mm512_set1_epi32(-1);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t i = c.begin, below = 0;
  for (; i + 16 <= c.end; i += 16) {
    __m512i key = _mm512_and_si512(_mm512_loadu_si512(bits + i), clear);
    if (mask) {
      const __m128i m8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mask + i));
      const __m512i m = _mm512_cvtepu8_epi32(m8);
      key = _mm512_mask_mov_epi32(sentinel, _mm512_test_epi32_mask(m, m), key);
    }
    const __mmask16 above = _mm512_cmpgt_epu32_mask(key, vhi);
    const __mmask16 kept = _mm512_mask_cmpneq_epu32_mask(above, key, sentinel);
    const __m128i kept8 = _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(kept, one));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(keep + i), kept8);
    below += __builtin_popcount(_mm512_cmplt_epu32_mask(key, vlo));
    const __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(key, vlo), span);
    if (in) {
      out.keys.Reserve(out.keys.size + 16);
      out.offsets.Reserve(out.offsets.size + 16);
      const __m512i offset =
          _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(i - c.begin)));
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
#endif

bool HasAvx512() {
#ifdef JPRUNE_AVX512
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

// Adds the high 16 bits of a chunk's keys to a histogram.
void Histogram(const Chunk& c, uint32_t* h) {
  ForKeys(c, [h](int64_t, uint32_t key) { ++h[key >> 16]; });
}

class Group {
 public:
  // `simd`: split with AVX-512 where the CPU has it (the masks are the same either way).
  Group(std::vector<Leaf*> leaves, ffi::ThreadPool* pool, int workers, bool simd)
      : leaves_(std::move(leaves)), chunks_(Chunks(leaves_)), parts_(chunks_.size()), pool_(pool),
        avx512_(simd && HasAvx512()) {
    for (const Leaf* l : leaves_) total_ += l->n;
    const int64_t nc = static_cast<int64_t>(chunks_.size());
    workers_ = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(workers, nc)));
  }

  // Prunes the k smallest keys, ties by flat index (k clamped to the candidates).
  void Prune(int64_t k) {
    k = std::max<int64_t>(k, 0);
    int64_t below = 0, bracketed = 0;
    if (total_ <= kSmall) {  // a small group brackets every key
      SplitAll(0, kMaxKey, &below, &bracketed);
      k = std::min(k, bracketed);
    } else {  // a histogram finds the high 16 bits of the k-th key: bracket that bucket
      uint32_t lo = 0, hi = 0;  // k == 0: the keys of 0, all kept
      const uint32_t bucket = k > 0 ? Bucket(&k) : 0;
      if (k > 0) lo = bucket << 16, hi = lo | 0xFFFF;
      SplitAll(lo, hi, &below, &bracketed);
    }
    Decide(k > 0 ? Rank(k - below - 1) : Kth{});
  }

 private:
  static constexpr uint32_t kMaxKey = 0x7FFFFFFF;  // real keys are at most this

  // The k-th smallest key t; of the keys equal to t, the first `take` (in flat order) are pruned.
  struct Kth {
    uint32_t t = 0;
    int64_t take = 0;
  };

  template <class F>
  void ForChunks(const F& f) {
    ParallelFor(pool_, workers_, static_cast<int64_t>(chunks_.size()), f);
  }

  void SplitAll(uint32_t lo, uint32_t hi, int64_t* below, int64_t* bracketed) {
    ForChunks([&](int64_t c, int) {
      Undecided& part = parts_[c];
      part.below = 0;
      part.keys.size = part.offsets.size = 0;
#ifdef JPRUNE_AVX512
      if (avx512_) return SplitAvx512(chunks_[c], lo, hi, part);
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

  // The high 16 bits of the k-th key, from a histogram of them; clamps k to the candidates.
  uint32_t Bucket(int64_t* k) {
    std::vector<Scratch> hist(workers_);
    for (Scratch& h : hist) {
      h.Reserve(kBins);
      std::fill(h.data(), h.data() + kBins, 0u);
    }
    ForChunks([&](int64_t c, int slot) { Histogram(chunks_[c], hist[slot].data()); });
    int64_t sentinels = 0;  // the top bin holds only sentinels
    for (Scratch& h : hist) sentinels += h.data()[kBins - 1];
    *k = std::clamp<int64_t>(*k, 0, total_ - sentinels);
    uint32_t bucket = 0;
    for (int64_t below = 0; *k > 0; ++bucket) {
      for (Scratch& h : hist) below += h.data()[bucket];
      if (below >= *k) break;
    }
    return bucket;
  }

  std::vector<Leaf*> leaves_;
  std::vector<Chunk> chunks_;
  std::vector<Undecided> parts_;
  ffi::ThreadPool* pool_;
  bool avx512_;
  int workers_;
  int64_t total_ = 0;
};

// Args: k (int32, one per group), then one float32 or uint32 array per leaf, then the masks of
// the leaves listed in `masked`. Rets: one bool array per leaf. `joint`: all leaves form one group;
// otherwise each leaf is its own group.
ffi::Error SelectImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> ks, ffi::RemainingArgs args,
                      ffi::RemainingRets rets, bool joint, ffi::Span<const int64_t> masked,
                      bool simd) {
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
    const ffi::DataType dt = x->element_type();
    if ((dt != ffi::DataType::F32 && dt != ffi::DataType::U32) ||
        (*keep)->element_type() != ffi::DataType::PRED ||
        (*keep)->element_count() != x->element_count()) {
      return ffi::Error::InvalidArgument("jprune_select: leaves must be float32 or uint32");
    }
    leaves[i] = {static_cast<const uint32_t*>(x->untyped_data()), nullptr,
                 static_cast<bool*>((*keep)->untyped_data()),
                 static_cast<int64_t>(x->element_count()),
                 dt == ffi::DataType::F32 ? 0x7FFFFFFFu : 0xFFFFFFFFu};
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
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return leaves[a].n > leaves[b].n; });
  ParallelFor(&pool, workers, n_groups, [&](int64_t i, int) {
    const int64_t g = order[i];
    Group({&leaves[g]}, nullptr, 1, simd).Prune(ks.typed_data()[g]);
  });
  return ffi::Error::Success();
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
                                  .Attr<bool>("simd"));

// The Python module: `select`, a capsule for jax.ffi.register_ffi_target.
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
  return m;
}
