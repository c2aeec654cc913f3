// CPU executor of the GEMM plan: straightforward row-at-a-time loops whose inner loop runs over
// contiguous memory, so the compiler vectorises it. Plain C++, no torch headers.
#include "conv1d_cpu.h"

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

template <typename T>
void run_items(const GemmTask& t, const T* a_base, const T* b_base, AccOf<T>* c_base, int64_t begin,
               int64_t end) {
  using Acc = AccOf<T>;
  const bool sum_batches = t.c.batch_stride == 0;
  std::vector<Acc> acc(static_cast<size_t>(t.n));
  std::vector<Acc> a_row(static_cast<size_t>(t.k));
  for (int64_t item = begin; item < end; ++item) {
    const int64_t c_batch = item / t.m, i = item % t.m;
    std::fill(acc.begin(), acc.end(), Acc(0));
    const int64_t first = sum_batches ? 0 : c_batch, last = sum_batches ? t.batch : c_batch + 1;
    for (int64_t bi = first; bi < last; ++bi) {
      const T* a = a_base + t.a.offset + bi * t.a.batch_stride;
      const T* b = b_base + t.b.offset + bi * t.b.batch_stride;
      // Row i of op(A), widened once.
      for (int64_t l = 0; l < t.k; ++l) {
        a_row[l] = widen(t.a.transposed ? a[l * t.a.row_stride + i] : a[i * t.a.row_stride + l]);
      }
      if (t.b.transposed) {  // op(B)[l, j] = stored[j, l]: a dot product per output column.
        for (int64_t j = 0; j < t.n; ++j) {
          const T* b_row = b + j * t.b.row_stride;
          Acc dot = 0;
          for (int64_t l = 0; l < t.k; ++l) dot += a_row[l] * widen(b_row[l]);
          acc[j] += dot;
        }
      } else {  // op(B)[l, :] is a stored row: accumulate a scaled copy of it.
        for (int64_t l = 0; l < t.k; ++l) {
          const T* b_row = b + l * t.b.row_stride;
          const Acc scale = a_row[l];
          for (int64_t j = 0; j < t.n; ++j) acc[j] += scale * widen(b_row[j]);
        }
      }
    }
    Acc* c = c_base + t.c.offset + c_batch * t.c.batch_stride + i * t.c.row_stride;
    for (int64_t j = 0; j < t.n; ++j) c[j] += acc[j];
  }
}

}  // namespace

int64_t cpu_task_items(const GemmTask& task) {
  if (task.m <= 0 || task.n <= 0 || task.batch <= 0) return 0;
  return task.m * (task.c.batch_stride == 0 ? 1 : task.batch);
}

void cpu_run_task_items(const GemmTask& task, DType ab_dtype, const void* a, const void* b, void* c,
                        int64_t begin, int64_t end) {
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
