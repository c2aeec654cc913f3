// CPU executor of the GEMM plan. Each work item is a row of C; rows are taken four at a time so
// that every element of B, once widened, feeds four accumulators, and the inner loop runs over a
// contiguous row of B, which the compiler vectorises. Plain C++, no torch headers.
#include "conv1d_cpu.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace orca {
namespace {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }
inline float widen(Half v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1Fu;
  uint32_t mantissa = v.bits & 0x3FFu;
  if (exponent == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));  // inf / nan
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_to_float(sign);
  // Subnormal: shift the leading one into the implicit bit, lowering the exponent per shift.
  uint32_t shifts = 0;
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    ++shifts;
  }
  return bits_to_float(sign | ((113u - shifts) << 23) | ((mantissa & 0x3FFu) << 13));
}

template <typename T>
using AccOf = decltype(widen(T{}));

constexpr int kRowBlock = 4;

// acc[r][:] += op(A)[i0 + r, l] * B[l, :] for r < kRows and every l (B stored [k, n] row-major).
template <int kRows, typename T>
void accumulate_rows(const GemmTask& t, const T* a, const T* b, int64_t i0, AccOf<T>* acc) {
  using Acc = AccOf<T>;
  for (int64_t l = 0; l < t.k; ++l) {
    Acc scale[kRows];
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = i0 + r;
      scale[r] = widen(t.a.transposed ? a[l * t.a.row_stride + i] : a[i * t.a.row_stride + l]);
    }
    const T* b_row = b + l * t.b.row_stride;
    for (int64_t j = 0; j < t.n; ++j) {
      const Acc value = widen(b_row[j]);
      for (int r = 0; r < kRows; ++r) acc[r * t.n + j] += scale[r] * value;
    }
  }
}

template <typename T>
void run_items(const GemmTask& t, const T* a_base, const T* b_base, AccOf<T>* c_base, int64_t begin, int64_t end) {
  using Acc = AccOf<T>;
  const bool sum_batches = t.c.batch_stride == 0;
  std::vector<Acc> acc(static_cast<size_t>(kRowBlock * t.n));
  for (int64_t item = begin; item < end;) {
    const int64_t c_batch = item / t.m, i0 = item % t.m;
    const int64_t rows = std::min<int64_t>({kRowBlock, t.m - i0, end - item});
    std::fill(acc.begin(), acc.end(), Acc(0));
    const int64_t first = sum_batches ? 0 : c_batch, last = sum_batches ? t.batch : c_batch + 1;
    for (int64_t bi = first; bi < last; ++bi) {
      const T* a = a_base + t.a.offset + bi * t.a.batch_stride;
      const T* b = b_base + t.b.offset + bi * t.b.batch_stride;
      if (rows == kRowBlock) {
        accumulate_rows<kRowBlock>(t, a, b, i0, acc.data());
      } else {
        for (int64_t r = 0; r < rows; ++r) accumulate_rows<1>(t, a, b, i0 + r, acc.data() + r * t.n);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      Acc* c = c_base + t.c.offset + c_batch * t.c.batch_stride + (i0 + r) * t.c.row_stride;
      for (int64_t j = 0; j < t.n; ++j) c[j] += acc[r * t.n + j];
    }
    item += rows;
  }
}

}  // namespace

int64_t cpu_task_items(const GemmTask& task) {
  if (task.m <= 0 || task.n <= 0 || task.batch <= 0) return 0;
  return task.m * (task.c.batch_stride == 0 ? 1 : task.batch);
}

void cpu_run_task_items(const GemmTask& task, DType ab_dtype, const void* a, const void* b, void* c,
                        int64_t begin, int64_t end) {
  if (task.b.transposed) throw std::invalid_argument("the CPU executor needs B stored untransposed");
  switch (ab_dtype) {
    case DType::kFloat32:
      return run_items(task, static_cast<const float*>(a), static_cast<const float*>(b), static_cast<float*>(c),
                       begin, end);
    case DType::kFloat64:
      return run_items(task, static_cast<const double*>(a), static_cast<const double*>(b),
                       static_cast<double*>(c), begin, end);
    case DType::kFloat16:
      return run_items(task, static_cast<const Half*>(a), static_cast<const Half*>(b), static_cast<float*>(c),
                       begin, end);
    case DType::kBFloat16:
      return run_items(task, static_cast<const BFloat16*>(a), static_cast<const BFloat16*>(b),
                       static_cast<float*>(c), begin, end);
  }
  throw std::invalid_argument("unsupported dtype");
}

}  // namespace orca
