// A CPU emulator of CUDA thread blocks: CUDA C++ kernels compiled as host C++, with this
// header included before them, run on the CPU with checks of what a GPU would get wrong
// silently or hang on. README.md beside this file describes the model, every check and its
// message, and what the emulator cannot show.
//
// Every thread of a launch is a fiber (ucontext) on one OS thread. The scheduler runs one
// fiber at a time until it reaches a synchronization point (__syncthreads, a shuffle, an
// atomic, a fence) or exits, then picks the next, so the order is controlled by `Mode`:
//   fibers   which runnable thread of a CTA goes next: lowest index, highest, or seeded random;
//   ctas     the order CTAs start in (index, reverse, seeded random) and how many are
//            resident at once: `resident` > 1 interleaves their threads, with atomics as
//            switch points, as SMs running CTAs side by side do;
//   snapshot between two barriers each thread sees shared memory as of the last barrier
//            plus its own writes; at the barrier the writes are merged, and two threads
//            writing the same byte is reported as a race.
// Always on, in every mode:
//   - a launch has 1 to kMaxThreads threads per CTA and at least one CTA (1-D grids and blocks);
//   - each CTA gets its own shared memory (SE_SHARED), filled with NaN (all bytes 0xFF) at
//     its start, at most kSharedLimit bytes, with a guard after every array checked at each
//     barrier and at the CTA's end;
//   - __syncthreads() completes only when every live thread of the CTA waits at the same
//     source line; a thread at another barrier, or a warp stuck in a shuffle, is an error;
//   - a shuffle completes when every lane of its mask reached the same shuffle; a lane of
//     the mask that exited, waits at a barrier, or is missing from the CTA is an error, as
//     is a caller outside the mask and a source lane outside the mask;
//   - 16-byte __ldg/__ldcg/__stwb accesses must be 16-byte aligned and, when buffers are
//     registered (add_buffer), lie inside one: checked before the access, a clear error,
//     not a host segfault;
//   - an __ldg (non-coherent cache) read of bytes that the same launch changes is an error
//     (checked against the registered buffers' contents when the launch started); __ldcg
//     (L2) may read what the launch wrote;
//   - a global atomic needs a __threadfence() earlier in the issuing thread (the emulator
//     cannot see plain stores, so it checks that the publishing thread fenced at all);
//   - a spin-wait (load_acquire in a loop) yields to the other resident CTAs; one that
//     keeps spinning while nothing else makes progress is reported, not left to hang.
// What this cannot show: timing, the non-coherent cache itself, store reordering between
// CTAs, plain (scalar) loads and stores out of bounds, and device numerics; a GPU run with
// compute-sanitizer's memcheck, racecheck, synccheck and initcheck is the evidence for those.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <math.h>  // the kernels call expf, exp, isnan unqualified, as device code does

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __launch_bounds__
#define __launch_bounds__(...)
// A plain `static` array would be one copy for every CTA: kernels declare shared memory
// with SE_SHARED(type, name, [dims]), which the emulator backs per CTA (for nvcc, the
// kernels' own headers define it as `__shared__ type name dims`).
#undef __shared__
#define __shared__ static_assert(false, "declare shared memory with SE_SHARED(type, name, [dims])");

namespace se_emu {

enum class Order { Forward, Reverse, Random };

struct Mode {
  Order fibers = Order::Forward;
  Order ctas = Order::Forward;
  int resident = 1;  // CTAs in flight at once
  uint64_t seed = 0;
  bool snapshot = false;
};
inline Mode mode;
inline std::mt19937_64 rng;

inline void set_mode(const Mode& m) {
  TORCH_CHECK(m.resident >= 1, "emulator: resident CTAs must be at least 1, got ", m.resident);
  mode = m;
  rng.seed(m.seed);
}

inline Order order_named(const std::string& name) {
  if (name == "forward") return Order::Forward;
  if (name == "reverse") return Order::Reverse;
  TORCH_CHECK(name == "random", "emulator: an order is forward, reverse or random, got '", name,
              "'");
  return Order::Random;
}

// set_mode with the orders by name, as the extensions' set_mode ops take them.
inline void set_mode(const std::string& fibers, const std::string& ctas, int64_t resident,
                     int64_t seed, bool snapshot) {
  set_mode({order_named(fibers), order_named(ctas), static_cast<int>(resident),
            static_cast<uint64_t>(seed), snapshot});
}

// ---- buffers the kernels may touch, for the checks of 16-byte accesses ----------------

struct Buffer {
  std::string name;
  uintptr_t begin, end;
  std::vector<unsigned char> at_launch;  // contents when the current launch started
};
inline std::vector<Buffer> buffers;

inline void add_buffer(std::string name, const void* begin, int64_t bytes) {
  const auto b = reinterpret_cast<uintptr_t>(begin);
  buffers.push_back({std::move(name), b, b + static_cast<uintptr_t>(bytes), {}});
}
inline void clear_buffers() { buffers.clear(); }

// The innermost registered buffer holding address p (sub-buffers of a workspace lie inside it).
inline const Buffer* buffer_at(uintptr_t p) {
  const Buffer* best = nullptr;
  for (const Buffer& b : buffers)
    if (p >= b.begin && p < b.end && (best == nullptr || b.end - b.begin < best->end - best->begin))
      best = &b;
  return best;
}

inline std::string describe(uintptr_t p) {
  const Buffer* b = buffer_at(p);
  if (b == nullptr) return "an address outside every buffer";
  return "byte " + std::to_string(p - b->begin) + " of '" + b->name + "' (" +
         std::to_string(b->end - b->begin) + " bytes)";
}

// ---- fibers, CTAs, the scheduler ------------------------------------------------------

enum class State { Runnable, Barrier, Shuffle, Done };

struct Cta;
struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  Cta* cta = nullptr;
  uint3 index;
  State state = State::Runnable;
  const char* file = "";  // where it waits
  int line = 0;
  int64_t barriers = 0;
  unsigned mask = 0;       // shuffle: participating lanes, the lane read, values
  int src_lane = 0;
  uint64_t value = 0, result = 0;
  int64_t fences = 0;
};

constexpr size_t kSharedGuard = 64;  // 0xFF bytes after every shared array
constexpr size_t kSharedLimit = 48 * 1024;  // static shared memory per CTA
constexpr int kMaxThreads = 1024;  // threads per CTA on every GPU since compute capability 2.0

struct SharedArray {
  const char* file;
  int line;
  size_t bytes;
  std::vector<unsigned char> base;                // as of the last barrier (+ guard)
  std::vector<std::vector<unsigned char>> views;  // snapshot mode: one per thread
};

struct Cta {
  uint3 index;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<SharedArray>> shared;
  size_t shared_bytes = 0;
  int live = 0;
};

struct Launch {
  ucontext_t scheduler;
  Fiber* current = nullptr;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  dim3 block_dim, grid_dim;
  std::exception_ptr error;
  std::vector<uintptr_t> ldg_reads;
};
inline Launch launch_state;

constexpr size_t kStack = 256 * 1024, kStackGuard = 4096;
inline std::vector<char*> free_stacks;

inline char* take_stack() {
  if (!free_stacks.empty()) {
    char* s = free_stacks.back();
    free_stacks.pop_back();
    return s;
  }
  void* p = mmap(nullptr, kStack + kStackGuard, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "emulator: cannot map a fiber stack");
  mprotect(p, kStackGuard, PROT_NONE);  // an overflow faults instead of corrupting memory
  return static_cast<char*>(p);
}

inline Fiber& me() { return *launch_state.current; }

// Switch points in a row that were spin-wait polls: past kSpinLimit nothing else ran.
inline int64_t spins = 0;
constexpr int64_t kSpinLimit = 100000;

inline void yield() {
  spins = 0;
  swapcontext(&me().context, &launch_state.scheduler);
}

inline std::string where(const Fiber& f) {
  return "thread " + std::to_string(f.index.x) + " of CTA " + std::to_string(f.cta->index.x);
}

inline void fiber_main() {
  Fiber& f = me();
  try {
    launch_state.body(launch_state.arg);
  } catch (...) {
    if (!launch_state.error) launch_state.error = std::current_exception();
  }
  f.state = State::Done;
  --f.cta->live;
  // returning resumes uc_link: the scheduler
}

inline void check_shared_guards(const Cta& c) {
  for (const auto& a : c.shared) {
    auto intact = [&](const std::vector<unsigned char>& v) {
      return std::all_of(v.begin() + a->bytes, v.end(), [](unsigned char b) { return b == 0xFF; });
    };
    bool ok = intact(a->base);
    for (const auto& v : a->views) ok = ok && intact(v);
    TORCH_CHECK(ok, "emulator: a thread of CTA ", c.index.x, " wrote past the end of the shared "
                "array declared at ", a->file, ":", a->line, " (", a->bytes, " bytes)");
  }
}

// Snapshot mode, at a barrier: every byte a thread changed since the last barrier goes to
// the shared state; two threads changing the same byte is a race.
inline void merge_shared(Cta& c) {
  for (auto& a : c.shared) {
    std::vector<int> writer(a->bytes, -1);
    for (size_t t = 0; t < a->views.size(); ++t) {
      const unsigned char* v = a->views[t].data();
      const unsigned char* b = a->base.data();
      for (size_t i = 0; i < a->bytes; i += 8) {
        const size_t n = std::min<size_t>(8, a->bytes - i);
        if (memcmp(v + i, b + i, n) == 0) continue;
        for (size_t k = i; k < i + n; ++k) {
          if (v[k] == b[k]) continue;
          TORCH_CHECK(writer[k] < 0, "emulator: threads ", writer[k], " and ", t, " of CTA ",
                      c.index.x, " both wrote byte ", k, " of the shared array declared at ",
                      a->file, ":", a->line, " between two barriers (a race)");
          writer[k] = static_cast<int>(t);
        }
      }
    }
    for (size_t k = 0; k < a->bytes; ++k)
      if (writer[k] >= 0) a->base[k] = a->views[writer[k]][k];
    for (auto& v : a->views) v = a->base;
  }
}

// Completes the shuffles whose lanes have all arrived and the barrier once every live thread
// waits at it; fails on what would hang or be undefined on a GPU.
inline void settle(Cta& c) {
  const int threads = static_cast<int>(c.fibers.size());
  for (int w0 = 0; w0 < threads; w0 += 32) {
    Fiber* first = nullptr;
    for (int t = w0; t < std::min(threads, w0 + 32); ++t)
      if (c.fibers[t].state == State::Shuffle) { first = &c.fibers[t]; break; }
    if (first == nullptr) continue;
    const unsigned mask = first->mask;
    bool ready = true;
    for (int lane = 0; lane < 32; ++lane) {
      if (!(mask >> lane & 1u)) continue;
      const int t = w0 + lane;
      TORCH_CHECK(t < threads, "emulator: the shuffle at ", first->file, ":", first->line,
                  " (", where(*first), ") names lane ", lane, " in its mask, which this CTA "
                  "of ", threads, " threads does not have");
      const Fiber& f = c.fibers[t];
      TORCH_CHECK(f.state != State::Done, "emulator: the shuffle at ", first->file, ":",
                  first->line, " (", where(*first), ", mask 0x", std::hex, mask, std::dec,
                  ") needs lane ", lane, ", which has exited");
      TORCH_CHECK(f.state != State::Barrier, "emulator: the shuffle at ", first->file, ":",
                  first->line, " (", where(*first), ") needs lane ", lane, ", which waits at "
                  "__syncthreads() at ", f.file, ":", f.line);
      if (f.state == State::Runnable) { ready = false; continue; }
      TORCH_CHECK(f.line == first->line && f.file == first->file && f.mask == mask,
                  "emulator: lanes of one warp at different shuffles: ", where(*first), " at ",
                  first->file, ":", first->line, ", ", where(f), " at ", f.file, ":", f.line);
    }
    if (!ready) continue;
    for (int lane = 0; lane < 32; ++lane) {
      if (!(mask >> lane & 1u)) continue;
      Fiber& f = c.fibers[w0 + lane];
      TORCH_CHECK(mask >> f.src_lane & 1u, "emulator: the shuffle at ", f.file, ":", f.line,
                  " (", where(f), ") reads lane ", f.src_lane, ", outside its mask 0x", std::hex,
                  mask);
      f.result = c.fibers[w0 + f.src_lane].value;
    }
    for (int lane = 0; lane < 32; ++lane)
      if (mask >> lane & 1u) c.fibers[w0 + lane].state = State::Runnable;
  }

  const Fiber* at_barrier = nullptr;
  for (const Fiber& f : c.fibers) {
    if (f.state == State::Runnable || f.state == State::Shuffle) return;
    if (f.state == State::Barrier && at_barrier == nullptr) at_barrier = &f;
  }
  if (at_barrier == nullptr) return;  // every thread exited
  for (const Fiber& f : c.fibers) {
    if (f.state != State::Barrier) continue;
    TORCH_CHECK(f.line == at_barrier->line && f.file == at_barrier->file &&
                    f.barriers == at_barrier->barriers,
                "emulator: threads of a CTA wait at different __syncthreads(): ",
                where(*at_barrier), " at ", at_barrier->file, ":", at_barrier->line, " (barrier #",
                at_barrier->barriers, "), ", where(f), " at ", f.file, ":", f.line, " (barrier #",
                f.barriers, ")");
  }
  check_shared_guards(c);
  if (mode.snapshot) merge_shared(c);
  for (Fiber& f : c.fibers)
    if (f.state == State::Barrier) f.state = State::Runnable;
}

inline void start_cta(Cta& c, uint3 index, int threads) {
  c.index = index;
  c.fibers.resize(threads);
  c.live = threads;
  for (int i = 0; i < threads; ++i) {
    Fiber& f = c.fibers[i];
    f = Fiber{};
    f.cta = &c;
    f.index = make_uint3(static_cast<unsigned>(i), 0, 0);
    f.stack = take_stack();
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack + kStackGuard;
    f.context.uc_stack.ss_size = kStack;
    f.context.uc_link = &launch_state.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
}

inline void release_cta(Cta& c) {
  for (Fiber& f : c.fibers)
    if (f.stack != nullptr) free_stacks.push_back(std::exchange(f.stack, nullptr));
}

inline Fiber* pick_fiber(Cta& c) {
  const int n = static_cast<int>(c.fibers.size());
  switch (mode.fibers) {
    case Order::Forward:
      for (int i = 0; i < n; ++i)
        if (c.fibers[i].state == State::Runnable) return &c.fibers[i];
      break;
    case Order::Reverse:
      for (int i = n - 1; i >= 0; --i)
        if (c.fibers[i].state == State::Runnable) return &c.fibers[i];
      break;
    case Order::Random: {
      int count = 0;
      for (const Fiber& f : c.fibers) count += f.state == State::Runnable;
      if (count == 0) break;
      int k = static_cast<int>(rng() % static_cast<uint64_t>(count));
      for (Fiber& f : c.fibers)
        if (f.state == State::Runnable && k-- == 0) return &f;
      break;
    }
  }
  return nullptr;
}

inline std::vector<int64_t> cta_order(int64_t ctas) {
  std::vector<int64_t> order(static_cast<size_t>(ctas));
  std::iota(order.begin(), order.end(), int64_t(0));
  if (mode.ctas == Order::Reverse) std::reverse(order.begin(), order.end());
  if (mode.ctas == Order::Random) std::shuffle(order.begin(), order.end(), rng);
  return order;
}

inline void begin_launch_checks() {
  launch_state.ldg_reads.clear();
  for (Buffer& b : buffers)
    b.at_launch.assign(reinterpret_cast<const unsigned char*>(b.begin),
                       reinterpret_cast<const unsigned char*>(b.end));
}

// __ldg goes through the non-coherent cache, which is not kept coherent with the launch's own
// stores: every byte read that way must be unchanged since the launch started.
inline void end_launch_checks() {
  auto& reads = launch_state.ldg_reads;
  std::sort(reads.begin(), reads.end());
  reads.erase(std::unique(reads.begin(), reads.end()), reads.end());
  for (uintptr_t p : reads) {
    const Buffer* b = buffer_at(p);
    if (b == nullptr) continue;  // checked when read
    const auto* now = reinterpret_cast<const unsigned char*>(p);
    TORCH_CHECK(memcmp(now, b->at_launch.data() + (p - b->begin), 16) == 0,
                "emulator: __ldg read ", describe(p), ", which the same launch writes (the "
                "non-coherent cache may return the old value)");
  }
  for (Buffer& b : buffers) b.at_launch = {};
}

// Runs body(arg) for `ctas` CTAs of `threads` threads under the current mode.
inline void run_grid(int64_t ctas, int threads, void (*body)(void*), void* arg) {
  TORCH_CHECK(ctas >= 1 && ctas <= INT_MAX && threads >= 1 && threads <= kMaxThreads,
              "emulator: a launch of ", threads, " threads per CTA and ", ctas, " CTAs; a GPU "
              "takes 1 to ", kMaxThreads, " threads per CTA and 1 to ", INT_MAX, " CTAs");
  Launch& L = launch_state;
  L.body = body;
  L.arg = arg;
  L.block_dim = dim3(static_cast<unsigned>(threads), 1, 1);
  L.grid_dim = dim3(static_cast<unsigned>(ctas), 1, 1);
  L.error = nullptr;
  const std::vector<int64_t> order = cta_order(ctas);
  std::vector<std::unique_ptr<Cta>> resident;
  struct Release {
    std::vector<std::unique_ptr<Cta>>& r;
    ~Release() {
      for (auto& c : r) release_cta(*c);
      launch_state.current = nullptr;
    }
  } release{resident};
  begin_launch_checks();
  size_t next = 0, turn = 0;
  while (next < order.size() || !resident.empty()) {
    while (resident.size() < static_cast<size_t>(mode.resident) && next < order.size()) {
      resident.push_back(std::make_unique<Cta>());
      start_cta(*resident.back(), make_uint3(static_cast<unsigned>(order[next++]), 0, 0),
                threads);
    }
    const size_t k =
        mode.ctas == Order::Random ? rng() % resident.size() : turn++ % resident.size();
    Cta& c = *resident[k];
    Fiber* f = pick_fiber(c);
    TORCH_INTERNAL_ASSERT(f != nullptr);
    L.current = f;
    swapcontext(&L.scheduler, &f->context);
    L.current = nullptr;
    if (L.error) std::rethrow_exception(L.error);
    settle(c);
    if (c.live == 0) {
      check_shared_guards(c);
      release_cta(c);
      resident.erase(resident.begin() + static_cast<std::ptrdiff_t>(k));
      continue;
    }
    if (std::none_of(c.fibers.begin(), c.fibers.end(),
                     [](const Fiber& t) { return t.state == State::Runnable; })) {
      std::string states;
      for (const Fiber& t : c.fibers)
        if (t.state != State::Done)
          states += "\n  " + where(t) +
                    (t.state == State::Barrier ? " at __syncthreads() " : " at a shuffle ") +
                    t.file + ":" + std::to_string(t.line);
      TORCH_CHECK(false, "emulator: CTA ", c.index.x, " cannot proceed:", states);
    }
  }
  end_launch_checks();
}

// kernel(args...) on `ctas` CTAs of `threads` threads each, under the current mode: what
// kernel<<<ctas, threads>>>(args...) does on a GPU, returning when the grid has finished.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t ctas, int threads, const Args&... args) {
  struct Call {
    void (*kernel)(Params...);
    std::tuple<Params...> params;
  } call{kernel, std::tuple<Params...>(args...)};
  auto body = [](void* p) {
    auto* c = static_cast<Call*>(p);
    std::apply(c->kernel, c->params);
  };
  run_grid(ctas, threads, body, &call);
}

// ---- what the kernels call ------------------------------------------------------------

inline void sync_threads(const char* file, int line) {
  Fiber& f = me();
  f.state = State::Barrier;
  f.file = file;
  f.line = line;
  ++f.barriers;
  yield();
}

// A warp shuffle: returns `value` of lane `src` (this lane's own when `src` is -1, which the
// shuffles return for a source outside the lane's width-sized group).
template <typename V>
V shuffle(const char* file, int line, unsigned mask, V value, int src) {
  static_assert(sizeof(V) <= sizeof(uint64_t));
  Fiber& f = me();
  const int lane = static_cast<int>(f.index.x % 32);
  TORCH_CHECK(mask >> lane & 1u, "emulator: ", where(f), " calls the shuffle at ", file, ":",
              line, " but is not in its mask 0x", std::hex, mask);
  f.state = State::Shuffle;
  f.file = file;
  f.line = line;
  f.mask = mask;
  f.src_lane = src < 0 ? lane : src;
  f.value = 0;
  memcpy(&f.value, &value, sizeof(V));
  yield();
  V out;
  memcpy(&out, &f.result, sizeof(V));
  return out;
}

inline int lane_of_me() { return static_cast<int>(me().index.x % 32); }

template <typename V>
V shfl_xor(const char* file, int line, unsigned mask, V value, int lane_mask, int width = 32) {
  const int lane = lane_of_me(), src = lane ^ lane_mask;
  return shuffle(file, line, mask, value, src / width == lane / width ? src : -1);
}
template <typename V>
V shfl_down(const char* file, int line, unsigned mask, V value, int delta, int width = 32) {
  const int lane = lane_of_me(), src = lane + delta;
  return shuffle(file, line, mask, value, src / width == lane / width ? src : -1);
}
template <typename V>
V shfl_up(const char* file, int line, unsigned mask, V value, int delta, int width = 32) {
  const int lane = lane_of_me(), src = lane - delta;
  return shuffle(file, line, mask, value, src >= (lane / width) * width ? src : -1);
}
template <typename V>
V shfl_idx(const char* file, int line, unsigned mask, V value, int src_lane, int width = 32) {
  const int lane = lane_of_me();
  return shuffle(file, line, mask, value, (lane / width) * width + src_lane % width);
}

inline void* shared_array(size_t bytes, const char* file, int line) {
  Fiber& f = me();
  Cta& c = *f.cta;
  SharedArray* a = nullptr;
  for (auto& s : c.shared)
    if (s->line == line && s->file == file) a = s.get();
  if (a == nullptr) {
    c.shared_bytes += bytes;
    TORCH_CHECK(c.shared_bytes <= kSharedLimit, "emulator: CTA ", c.index.x, " declares ",
                c.shared_bytes, " bytes of shared memory, more than the ", kSharedLimit,
                " static shared memory allows");
    auto s = std::make_unique<SharedArray>();
    s->file = file;
    s->line = line;
    s->bytes = bytes;
    s->base.assign(bytes + kSharedGuard, 0xFF);  // NaN in every floating-point type
    if (mode.snapshot) s->views.assign(c.fibers.size(), s->base);
    a = s.get();
    c.shared.push_back(std::move(s));
  }
  return mode.snapshot ? a->views[f.index.x].data() : a->base.data();
}

// Where p lies in a shared array of the current CTA, for atomics on shared memory.
inline std::pair<SharedArray*, size_t> shared_at(const void* p) {
  const auto q = reinterpret_cast<const unsigned char*>(p);
  Fiber& f = me();
  for (auto& a : f.cta->shared) {
    const unsigned char* mine = mode.snapshot ? a->views[f.index.x].data() : a->base.data();
    if (q >= mine && q < mine + a->bytes) return {a.get(), static_cast<size_t>(q - mine)};
  }
  return {nullptr, 0};
}

// An atomic read-modify-write: a switch point, then op(*p) -> (new, returned). On shared
// memory in snapshot mode it acts on the shared state and every thread's view at once.
template <typename T, typename F>
T atomic_rmw(T* p, const char* what, F op) {
  auto [array, offset] = shared_at(p);
  if (array == nullptr) {
    TORCH_CHECK(me().fences > 0, "emulator: ", where(me()), " calls ", what, " on global "
                "memory without a __threadfence() before it: other CTAs may see the atomic "
                "before this CTA's stores");
  }
  yield();  // other threads and CTAs may run first
  if (array == nullptr || !mode.snapshot) {
    const auto [updated, returned] = op(*p);
    *p = updated;
    return returned;
  }
  T current;
  memcpy(&current, array->base.data() + offset, sizeof(T));
  const auto [updated, returned] = op(current);
  memcpy(array->base.data() + offset, &updated, sizeof(T));
  for (auto& v : array->views) memcpy(v.data() + offset, &updated, sizeof(T));
  return returned;
}

// A poll of a spin-wait: other threads and CTAs run first.
inline unsigned load_acquire(const unsigned* p) {
  TORCH_CHECK(++spins <= kSpinLimit, "emulator: ", where(me()), " spins on a counter that "
              "no resident CTA will advance (a wait on work no running CTA holds)");
  swapcontext(&me().context, &launch_state.scheduler);
  return *p;
}

inline void thread_fence() {
  ++me().fences;
  yield();
}

// 16-byte accesses since the count was last reset (tests check the vector path is taken).
inline int64_t vector_accesses = 0;

inline void check_vector_access(const void* p, const char* what) {
  ++vector_accesses;
  const auto a = reinterpret_cast<uintptr_t>(p);
  TORCH_CHECK(a % 16 == 0, "emulator: misaligned 16-byte ", what, " by ", where(me()), " at ",
              describe(a), ": address % 16 = ", a % 16);
  if (buffers.empty()) return;
  const Buffer* b = buffer_at(a);
  TORCH_CHECK(b != nullptr && a + 16 <= b->end, "emulator: 16-byte ", what, " by ", where(me()),
              " at ", describe(a), " runs outside the buffer");
}

}  // namespace se_emu

#define threadIdx (::se_emu::me().index)
#define blockIdx (::se_emu::me().cta->index)
#define blockDim (::se_emu::launch_state.block_dim)
#define gridDim (::se_emu::launch_state.grid_dim)
#define __syncthreads() ::se_emu::sync_threads(__FILE__, __LINE__)
#define __shfl_xor_sync(...) ::se_emu::shfl_xor(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::se_emu::shfl_down(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::se_emu::shfl_up(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_sync(...) ::se_emu::shfl_idx(__FILE__, __LINE__, __VA_ARGS__)
#define SE_SHARED(T, name, dims)       \
  T(&name) dims = *static_cast<T(*) dims>( \
      ::se_emu::shared_array(sizeof(T dims), __FILE__, __LINE__))

inline uint4 __ldg(const uint4* p) {
  se_emu::check_vector_access(p, "load");
  se_emu::launch_state.ldg_reads.push_back(reinterpret_cast<uintptr_t>(p));
  return *p;
}
inline uint4 __ldcg(const uint4* p) {
  se_emu::check_vector_access(p, "load");
  return *p;
}
inline float __ldcg(const float* p) { return *p; }
inline double __ldcg(const double* p) { return *p; }
inline unsigned short __ldcg(const unsigned short* p) { return *p; }
inline void __stwb(uint4* p, uint4 v) {
  se_emu::check_vector_access(p, "store");
  *p = v;
}
inline void __threadfence() { se_emu::thread_fence(); }
template <typename T>
T atomicAdd(T* p, T v) {
  return se_emu::atomic_rmw(p, "atomicAdd", [v](T old) { return std::pair<T, T>(old + v, old); });
}
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  return se_emu::atomic_rmw(p, "atomicInc", [limit](unsigned old) {
    return std::pair<unsigned, unsigned>(old >= limit ? 0u : old + 1, old);
  });
}
template <typename T>
T atomicExch(T* p, T v) {
  return se_emu::atomic_rmw(p, "atomicExch", [v](T old) { return std::pair<T, T>(v, old); });
}
template <typename T>
T atomicCAS(T* p, T compare, T v) {
  return se_emu::atomic_rmw(p, "atomicCAS", [compare, v](T old) {
    return std::pair<T, T>(old == compare ? v : old, old);
  });
}
