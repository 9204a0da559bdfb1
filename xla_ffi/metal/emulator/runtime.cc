// Metal compute emulator runtime: runs each threadgroup as one fiber (ucontext) per simulated
// thread on the calling OS thread; barriers and SIMD-group functions switch fibers.
#include "runtime.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>


namespace {
// Formats without iostreams: a library linked with a static libstdc++ (gcc 13 on the GPU host)
// crashed inside std::ostringstream.
inline void Append(std::string& out, const std::string& s) { out += s; }
inline void Append(std::string& out, const char* s) { out += s; }
template <typename N, std::enable_if_t<std::is_arithmetic_v<N>, int> = 0>
inline void Append(std::string& out, N n) { out += std::to_string(n); }
template <typename... Parts>
std::string Concat(const Parts&... parts) {
  std::string out;
  (Append(out, parts), ...);
  return out;
}
}  // namespace

namespace jaxmps::metal_emu {

// ---- kernel registry -------------------------------------------------------------------------

namespace {
std::vector<KernelEntry>& Registry() {
  static std::vector<KernelEntry> kernels;  // filled by static initialisers, read-only after
  return kernels;
}
}  // namespace

void AddKernel(KernelEntry entry) { Registry().push_back(std::move(entry)); }

const KernelEntry* FindKernel(std::string_view name) {
  for (const KernelEntry& k : Registry())
    if (k.name == name) return &k;
  return nullptr;
}

const std::vector<KernelEntry>& Kernels() { return Registry(); }

// ---- options ---------------------------------------------------------------------------------

namespace {
std::mutex options_mutex;
Options options;
}  // namespace

void SetOptions(const Options& o) {
  std::lock_guard<std::mutex> lock(options_mutex);
  options = o;
}

Options GetOptions() {
  std::lock_guard<std::mutex> lock(options_mutex);
  return options;
}

// ---- fibers ----------------------------------------------------------------------------------

namespace {

// Stacks for the fibers of one launch, each below a PROT_NONE guard page so that an overflow
// faults instead of corrupting a neighbour.
class FiberStacks {
 public:
  static constexpr size_t kStackBytes = 256 * 1024;
  explicit FiberStacks(size_t count) : page_(size_t(sysconf(_SC_PAGESIZE))) {
    stride_ = kStackBytes + page_;
    bytes_ = stride_ * count;
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    base_ = p == MAP_FAILED ? nullptr : static_cast<char*>(p);
    for (size_t i = 0; base_ && i < count; ++i) mprotect(base_ + i * stride_, page_, PROT_NONE);
  }
  ~FiberStacks() {
    if (base_) munmap(base_, bytes_);
  }
  bool ok() const { return base_ != nullptr; }
  char* stack(size_t i) const { return base_ + i * stride_ + page_; }

 private:
  size_t page_, stride_ = 0, bytes_ = 0;
  char* base_ = nullptr;
};

enum class State { kReady, kAtBarrier, kAtSimd, kDone };

struct Fiber {
  ucontext_t context;
  State state = State::kReady;
  ThreadIds ids;
  uint64_t simd_ops = 0;  // SIMD-group functions this thread has completed
  const char* wait_file = "";
  uint32_t wait_line = 0;
};

// Two generations of deposit slots per SIMD-group: a lane can run ahead to the next SIMD
// function (writing the other generation) while slower lanes still read this one, but never
// two ahead, because the next exchange needs every lane.
struct SimdSlots {
  alignas(16) unsigned char value[2][kMaxSimdWidth][kSimdSlotBytes];
  uint64_t active[2] = {0, 0};
};

struct GroupRun {
  const KernelEntry* kernel = nullptr;
  const std::vector<void*>* args = nullptr;
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<SimdSlots> simd;
  Fiber* current = nullptr;
};

thread_local GroupRun* tls_run = nullptr;

void FiberMain() {
  GroupRun* run = tls_run;
  Fiber* self = run->current;
  run->kernel->invoke(run->args->data(), self->ids);
  self->state = State::kDone;  // returning switches to uc_link, the scheduler
}

void Block(State state, const char* file, uint32_t line) {
  GroupRun* run = tls_run;
  Fiber* self = run->current;
  self->state = state;
  self->wait_file = file;
  self->wait_line = line;
  swapcontext(&self->context, &run->scheduler);
}

std::string Where(const Fiber& f) {
  return Concat("thread ", f.ids.thread_index, " at ", f.wait_file ? f.wait_file : "?", ":",
                f.wait_line);
}

// Releases SIMD-group `group` if every lane of it that has not returned waits in the same
// SIMD-group function. Returns false with `error` set when they all wait, but in different ones.
bool ReleaseSimdGroup(GroupRun& run, uint32_t group, std::string* error) {
  const uint32_t width = run.fibers[0].ids.simd_width;
  const size_t first = size_t(group) * width;
  const size_t last = std::min(run.fibers.size(), first + width);
  const Fiber* waiting = nullptr;
  uint64_t mask = 0;
  for (size_t i = first; i < last; ++i) {
    const Fiber& f = run.fibers[i];
    if (f.state == State::kDone) continue;
    if (f.state != State::kAtSimd) return true;  // a lane is still on its way
    if (waiting && (f.simd_ops != waiting->simd_ops || f.wait_line != waiting->wait_line ||
                    std::strcmp(f.wait_file, waiting->wait_file) != 0)) {
      *error = "SIMD-group lanes wait in different SIMD-group functions (" + Where(*waiting) +
               ", " + Where(f) + "); call them in SIMD-group-uniform control flow";
      return false;
    }
    waiting = &f;
    mask |= uint64_t(1) << (i - first);
  }
  if (!waiting) return true;
  run.simd[group].active[waiting->simd_ops & 1] = mask;
  for (size_t i = first; i < last; ++i)
    if (run.fibers[i].state == State::kAtSimd) run.fibers[i].state = State::kReady;
  return true;
}

// The runnable thread to resume next: the first in `order` (forward, reverse), or a random one
// (shuffle). Always resuming the same thread first lets it, and its SIMD-group, run as far
// ahead of the others as the barriers allow, which is where a missing barrier shows.
Fiber* NextReady(GroupRun& run, const std::vector<size_t>& order, std::mt19937_64& rng,
                 Schedule schedule, std::vector<size_t>& ready) {
  if (schedule != Schedule::kShuffle) {
    for (size_t i : order)
      if (run.fibers[i].state == State::kReady) return &run.fibers[i];
    return nullptr;
  }
  ready.clear();
  for (size_t i = 0; i < run.fibers.size(); ++i)
    if (run.fibers[i].state == State::kReady) ready.push_back(i);
  if (ready.empty()) return nullptr;
  return &run.fibers[ready[std::uniform_int_distribution<size_t>(0, ready.size() - 1)(rng)]];
}

// Runs one threadgroup to completion. Returns "" or an error.
std::string RunGroup(GroupRun& run, const FiberStacks& stacks, const std::vector<size_t>& order,
                     std::mt19937_64& rng, Schedule schedule) {
  for (size_t i = 0; i < run.fibers.size(); ++i) {
    Fiber& f = run.fibers[i];
    f.state = State::kReady;
    f.simd_ops = 0;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stacks.stack(i);
    f.context.uc_stack.ss_size = FiberStacks::kStackBytes;
    f.context.uc_link = &run.scheduler;
    makecontext(&f.context, FiberMain, 0);
  }
  for (SimdSlots& s : run.simd) std::memset(s.value, kPoisonByte, sizeof(s.value));
  std::vector<size_t> ready;
  std::string error;
  while (true) {
    if (Fiber* f = NextReady(run, order, rng, schedule, ready)) {
      run.current = f;
      swapcontext(&run.scheduler, &f->context);
      // A lane that arrives at a SIMD-group function, or returns, may complete its group.
      if (!ReleaseSimdGroup(run, f->ids.simd_group, &error)) return error;
      continue;
    }
    // Nobody can run: every thread waits at a barrier or in a SIMD-group function, or returned.
    size_t at_barrier = 0, done = 0;
    const Fiber* first_waiting = nullptr;
    for (const Fiber& f : run.fibers) {
      if (f.state == State::kDone) ++done;
      if (f.state != State::kAtBarrier) continue;
      ++at_barrier;
      if (!first_waiting) first_waiting = &f;
      if (f.wait_line != first_waiting->wait_line ||
          std::strcmp(f.wait_file, first_waiting->wait_file) != 0) {
        return "threads wait at different threadgroup barriers (" + Where(*first_waiting) +
               ", " + Where(f) + ")";
      }
    }
    if (done == run.fibers.size()) return "";
    if (at_barrier == run.fibers.size()) {
      for (Fiber& f : run.fibers) f.state = State::kReady;
      continue;
    }
    return Concat("deadlock: of ", run.fibers.size(), " threads, ", at_barrier,
                  " wait at a threadgroup barrier",
                  first_waiting ? " (" + Where(*first_waiting) + ")" : std::string(), ", ", done,
                  " returned and ", run.fibers.size() - at_barrier - done,
                  " wait in a SIMD-group function; a barrier must be reached by every thread "
                  "of the threadgroup");
  }
}

uint32_t Volume(const uint3& v) { return v.x * v.y * v.z; }

std::string CheckBindings(const KernelEntry& kernel, const LaunchConfig& c) {
  const size_t nb = c.buffers.size(), nt = c.threadgroup_bytes.size();
  if (nb + nt != kernel.params.size()) {
    return Concat(kernel.name, " has ", kernel.params.size(), " buffer/threadgroup parameters, ",
                  "the launch binds ", nb, " buffers and ", nt, " threadgroup allocations");
  }
  if (c.buffer_bytes.size() != nb) return "buffer_bytes must give one size per buffer";
  for (size_t i = 0; i < nb; ++i) {
    const ParamInfo& p = kernel.params[i];
    if (!p.is_pointer && c.buffer_bytes[i] != p.value_bytes) {
      return Concat(kernel.name, ": buffer(", i, ") is a ", p.value_bytes,
                    "-byte constant struct, the launch binds ", c.buffer_bytes[i], " bytes");
    }
    if (!p.is_pointer && c.buffers[i] == nullptr) {
      return Concat(kernel.name, ": buffer(", i, ") is not bound");
    }
  }
  uint64_t total = 0;
  for (size_t i = 0; i < nt; ++i) {
    if (!kernel.params[nb + i].is_pointer) {
      return Concat(kernel.name, ": threadgroup(", i, ") must be a pointer parameter");
    }
    // Metal requires threadgroup memory lengths in multiples of 16 bytes.
    if (c.threadgroup_bytes[i] % 16 != 0) {
      return Concat(kernel.name, ": threadgroup(", i, ") length ", c.threadgroup_bytes[i],
                    " is not a multiple of 16 bytes");
    }
    total += c.threadgroup_bytes[i];
  }
  if (total > 32 * 1024) return kernel.name + ": more than 32 KiB of threadgroup memory";
  const uint32_t threads = Volume(c.threads);
  if (threads == 0 || threads > 1024) {
    return Concat(kernel.name, ": ", threads, " threads per threadgroup (Metal allows 1..1024)");
  }
  return "";
}

}  // namespace

// ---- called from kernel code -----------------------------------------------------------------

void ThreadgroupBarrier(const char* file, uint32_t line) { Block(State::kAtBarrier, file, line); }

const ThreadIds& CurrentThread() { return tls_run->current->ids; }

const unsigned char* SimdExchange(const void* value, size_t bytes, uint64_t* active,
                                  const char* file, uint32_t line) {
  GroupRun* run = tls_run;
  Fiber* self = run->current;
  SimdSlots& slots = run->simd[self->ids.simd_group];
  const int generation = int(self->simd_ops & 1);
  std::memcpy(slots.value[generation][self->ids.lane], value, std::min(bytes, kSimdSlotBytes));
  Block(State::kAtSimd, file, line);
  self = tls_run->current;  // resumed by the scheduler once every live lane has deposited
  ++self->simd_ops;
  *active = slots.active[generation];
  return &slots.value[generation][0][0];
}

// ---- launch ----------------------------------------------------------------------------------

std::string Launch(const KernelEntry& kernel, const LaunchConfig& c) {
  if (std::string error = CheckBindings(kernel, c); !error.empty()) return error;
  const Options opts = GetOptions();
  const uint32_t threads = Volume(c.threads), groups = Volume(c.groups);
  if (groups == 0) return "";
  FiberStacks stacks(threads);
  if (!stacks.ok()) return "cannot map fiber stacks";

  GroupRun run;
  run.kernel = &kernel;
  run.fibers.resize(threads);
  const uint32_t width = opts.simd_width;
  run.simd.resize((threads + width - 1) / width);
  // Threadgroup memory: 16-byte aligned, poisoned before each threadgroup (Metal leaves it
  // undefined), so a read of anything the kernel did not write shows up as NaN.
  std::vector<std::unique_ptr<uint64_t[]>> shared;
  std::vector<void*> args(c.buffers);
  for (uint32_t bytes : c.threadgroup_bytes) {
    shared.emplace_back(new uint64_t[bytes / 8 + 2]);
    args.push_back(shared.back().get());
  }
  run.args = &args;

  std::mt19937_64 rng(opts.seed);
  std::vector<size_t> order(threads), group_order(groups);
  std::iota(order.begin(), order.end(), 0);
  std::iota(group_order.begin(), group_order.end(), 0);
  if (opts.schedule == Schedule::kReverse) {
    std::reverse(order.begin(), order.end());
    std::reverse(group_order.begin(), group_order.end());
  } else if (opts.schedule == Schedule::kShuffle) {
    std::shuffle(group_order.begin(), group_order.end(), rng);
  }

  GroupRun* previous = tls_run;
  tls_run = &run;
  std::string error;
  for (size_t g : group_order) {
    const uint3 gpos(uint32_t(g % c.groups.x), uint32_t(g / c.groups.x % c.groups.y),
                     uint32_t(g / (c.groups.x * c.groups.y)));
    for (size_t i = 0; i < c.threadgroup_bytes.size(); ++i)
      std::memset(shared[i].get(), kPoisonByte, c.threadgroup_bytes[i]);
    for (uint32_t t = 0; t < threads; ++t) {
      ThreadIds& ids = run.fibers[t].ids;
      ids.thread_in_group = uint3(t % c.threads.x, t / c.threads.x % c.threads.y,
                                  t / (c.threads.x * c.threads.y));
      ids.group_in_grid = gpos;
      ids.group_size = c.threads;
      ids.groups_in_grid = c.groups;
      ids.thread_in_grid = gpos * c.threads + ids.thread_in_group;
      ids.thread_index = t;
      ids.simd_width = width;
      ids.lane = t % width;
      ids.simd_group = t / width;
      ids.simd_groups = (threads + width - 1) / width;
    }
    error = RunGroup(run, stacks, order, rng, opts.schedule);
    if (!error.empty()) {
      error = Concat(kernel.name, ", threadgroup (", gpos.x, ", ", gpos.y, ", ", gpos.z,
                     "): ", error);
      break;
    }
  }
  tls_run = previous;
  return error;
}

}  // namespace jaxmps::metal_emu
