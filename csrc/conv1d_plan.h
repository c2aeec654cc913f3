// Strided Conv1d on channels-last rows, decomposed into batched GEMMs over strided views.
//
// Why GEMMs over views and not an implicit-GEMM kernel of our own: in channels-last layout the
// k-frame window of output row t starts at input row t*stride - padding, so the frames
// [c*stride, c*stride + stride) of every window are one contiguous run of stride*C_in elements,
// and successive output rows sit stride*C_in elements apart. A window therefore splits into
// ceil(k / stride) dense GEMM operands with leading dimension stride*C_in, which cuBLAS (tensor
// cores, fp32 accumulation) consumes directly: no im2col copy, no transpose of [B, T, H]. Only the
// few rows whose window touches the zero padding need extra, per-frame GEMMs. The same plan runs
// on the CPU executor, so every offset and stride handed to cuBLAS is exercised by the CPU tests.
//
// This header is plain C++: it is shared by the CPU executor, the CUDA executor (.cu, compiled
// without torch headers) and the torch glue.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace orca {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Sizes of one Conv1d: x[batch, length_in, channels_in] -> y[batch, length_out, channels_out].
struct Conv1dGeometry {
  int64_t batch;
  int64_t length_in;
  int64_t channels_in;
  int64_t length_out;
  int64_t channels_out;
  int64_t kernel_size;
  int64_t stride;
  int64_t padding;
};

// Element strides of a [batch, rows, channels] tensor whose channel stride is 1.
struct RowStrides {
  int64_t batch;
  int64_t row;
};

// Output rows [t_begin, t_begin + t_count) together with window frames
// [frame_begin, frame_begin + frame_count), every (row, frame) inside the input: the input row of
// (t, f) is t*stride - padding + f.
struct WindowPiece {
  int64_t t_begin;
  int64_t t_count;
  int64_t frame_begin;
  int64_t frame_count;
};

// A matrix stored row-major with unit column stride at `offset` elements from its pass's base
// pointer. `transposed` means the stored matrix is op(X)^T.
struct MatrixOperand {
  int64_t offset;
  int64_t row_stride;
  int64_t batch_stride;
  bool transposed;
};

// C[m, n] += op(A)[m, k] . op(B)[k, n] for every batch index; batch_stride of C == 0 means the
// products of all batch indices are summed into one C.
struct GemmTask {
  int64_t m;
  int64_t n;
  int64_t k;
  int64_t batch;
  MatrixOperand a;
  MatrixOperand b;
  MatrixOperand c;
};

// One pass = tasks run in order on shared base pointers. A and B hold `ab_dtype`; C holds the
// accumulation type (fp64 for fp64 inputs, fp32 otherwise) and is already initialised.
struct GemmPass {
  std::vector<GemmTask> tasks;
  DType ab_dtype;
  const void* a;
  const void* b;
  void* c;
};

inline int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// Output rows for which window frame f lies inside the input, as [first, last] (empty if last < first).
inline int64_t first_row_for_frame(const Conv1dGeometry& g, int64_t f) {
  return std::max<int64_t>(0, ceil_div(g.padding - f, g.stride));
}
inline int64_t last_row_for_frame(const Conv1dGeometry& g, int64_t f) {
  return std::min<int64_t>(g.length_out - 1, floor_div(g.length_in - 1 + g.padding - f, g.stride));
}

// BLAS takes sizes and leading dimensions as 32-bit ints.
constexpr int64_t kBlasIntMax = std::numeric_limits<int32_t>::max();

// Whether some output row's window reads a row of x, i.e. the plan has (row, frame) pairs: rows
// [first_row_for_frame(k - 1), last_row_for_frame(0)] are exactly those whose window overlaps x.
inline bool windows_read_input(const Conv1dGeometry& g) {
  return g.length_in > 0 && g.kernel_size > 0 &&
         first_row_for_frame(g, g.kernel_size - 1) <= last_row_for_frame(g, 0);
}

// Whether the forward and both gradients have GEMMs to run (otherwise the result is the bias, or
// zeros, or empty, whatever the stride).
inline bool plan_has_gemms(const Conv1dGeometry& g) {
  return g.batch > 0 && g.channels_in > 0 && g.channels_out > 0 && windows_read_input(g);
}

// The largest stride the plan runs for C_in input channels: successive output rows sit
// stride * C_in elements apart in x and in dx (both packed), the leading dimension of the GEMMs
// (x with wider rows is packed first where its row step would pass 32 bits), so
// stride * C_in <= 2**31 - 1. The glue and orca_kernels/strided_conv.py refuse a larger stride
// up front whenever `plan_has_gemms`.
inline int64_t max_stride(int64_t channels_in) { return kBlasIntMax / channels_in; }

// The largest padding for an input of length_in rows: length_in + 2 * padding is an int64.
inline int64_t max_padding(int64_t length_in) {
  return (std::numeric_limits<int64_t>::max() - length_in) / 2;
}

// Splits every window into chunks of at most `max_frames` frames (stride when the input rows are
// packed, 1 otherwise). Rows whose whole chunk is inside the input form one piece per chunk; the
// remaining valid (row, frame) pairs, near the padded edges, form at most two pieces per frame,
// merged across neighbouring frames that cover the same rows while the piece keeps at most
// `max_frames` frames (a GEMM's reduction may not pass its leading dimension, stride*C_in; the
// previous piece can be a full chunk, e.g. for one output row whose window spans three chunks).
// Every valid (row, frame) pair is covered exactly once.
inline std::vector<WindowPiece> window_pieces(const Conv1dGeometry& g, int64_t max_frames) {
  std::vector<WindowPiece> pieces;
  auto add_edge = [&](int64_t t_first, int64_t t_last, int64_t f) {
    if (t_last < t_first) return;
    WindowPiece* prev = pieces.empty() ? nullptr : &pieces.back();
    if (prev != nullptr && prev->t_begin == t_first && prev->t_count == t_last - t_first + 1 &&
        prev->frame_begin + prev->frame_count == f && prev->frame_count < max_frames) {
      prev->frame_count += 1;
    } else {
      pieces.push_back({t_first, t_last - t_first + 1, f, 1});
    }
  };
  for (int64_t f0 = 0; f0 < g.kernel_size; f0 += max_frames) {
    const int64_t nf = std::min(max_frames, g.kernel_size - f0);
    const int64_t lo = first_row_for_frame(g, f0);
    const int64_t hi = last_row_for_frame(g, f0 + nf - 1);
    const bool has_interior = lo <= hi;
    if (has_interior) pieces.push_back({lo, hi - lo + 1, f0, nf});
    // Edge rows before the interior, frame by frame, then after it.
    for (int64_t f = f0; f < f0 + nf; ++f) {
      const int64_t first = first_row_for_frame(g, f), last = last_row_for_frame(g, f);
      add_edge(first, has_interior ? std::min(last, lo - 1) : last, f);
    }
    if (!has_interior) continue;
    for (int64_t f = f0; f < f0 + nf; ++f) {
      add_edge(std::max(first_row_for_frame(g, f), hi + 1), last_row_for_frame(g, f), f);
    }
  }
  return pieces;
}

// Weight operand: the glue repacks nn.Conv1d's [C_out, C_in, k] as W' = [C_out, k, C_in] (a
// weight-sized copy that moves only the k taps, cheap next to a full transpose), so that the
// frames of a chunk are contiguous in every row. The forward reads it transposed (its reduction
// runs along W' rows), the input gradient untransposed.

// y[b, t, :] += sum_f x[b, t*s - p + f, :] . W'[:, f, :]^T ; A = x, B = W'^T, C = y [B, T_out, C_out].
inline std::vector<GemmTask> forward_tasks(const Conv1dGeometry& g, RowStrides x) {
  const bool packed = x.row == g.channels_in;
  std::vector<GemmTask> tasks;
  for (const WindowPiece& p : window_pieces(g, packed ? g.stride : 1)) {
    GemmTask t;
    t.m = p.t_count;
    t.n = g.channels_out;
    t.k = p.frame_count * g.channels_in;
    t.batch = g.batch;
    t.a = {(p.t_begin * g.stride - g.padding + p.frame_begin) * x.row, g.stride * x.row, x.batch, false};
    t.b = {p.frame_begin * g.channels_in, g.kernel_size * g.channels_in, 0, true};
    t.c = {p.t_begin * g.channels_out, g.channels_out, g.length_out * g.channels_out, false};
    tasks.push_back(t);
  }
  return tasks;
}

// dx[b, t*s - p + f, :] += dy[b, t, :] . W'[:, f, :] ; A = dy, B = W', C = dx [B, T, C_in] (packed).
inline std::vector<GemmTask> grad_input_tasks(const Conv1dGeometry& g, RowStrides dy) {
  std::vector<GemmTask> tasks;
  for (const WindowPiece& p : window_pieces(g, g.stride)) {
    GemmTask t;
    t.m = p.t_count;
    t.n = p.frame_count * g.channels_in;
    t.k = g.channels_out;
    t.batch = g.batch;
    t.a = {p.t_begin * dy.row, dy.row, dy.batch, false};
    t.b = {p.frame_begin * g.channels_in, g.kernel_size * g.channels_in, 0, false};
    t.c = {(p.t_begin * g.stride - g.padding + p.frame_begin) * g.channels_in, g.stride * g.channels_in,
           g.length_in * g.channels_in, false};
    tasks.push_back(t);
  }
  return tasks;
}

// dW'[:, f, :] += sum_{b,t} dy[b, t, :]^T x[b, t*s - p + f, :] ; A = dy (transposed), B = x,
// C = dW' [C_out, k, C_in], summed over the batch. A one-row piece folds the batch into the
// reduction (the batch stride becomes the row stride) so it is one GEMM instead of `batch` of them.
inline std::vector<GemmTask> grad_weight_tasks(const Conv1dGeometry& g, RowStrides dy, RowStrides x) {
  const bool packed = x.row == g.channels_in;
  std::vector<GemmTask> tasks;
  for (const WindowPiece& p : window_pieces(g, packed ? g.stride : 1)) {
    GemmTask t;
    t.m = g.channels_out;
    t.n = p.frame_count * g.channels_in;
    t.k = p.t_count;
    t.batch = g.batch;
    t.a = {p.t_begin * dy.row, dy.row, dy.batch, true};
    t.b = {(p.t_begin * g.stride - g.padding + p.frame_begin) * x.row, g.stride * x.row, x.batch, false};
    t.c = {p.frame_begin * g.channels_in, g.kernel_size * g.channels_in, 0, false};
    // The batch strides become leading dimensions: only while they fit in 32 bits.
    const bool foldable = t.k == 1 && t.batch > 1 && dy.batch >= t.m && x.batch >= t.n && dy.batch <= kBlasIntMax &&
                          x.batch <= kBlasIntMax;
    if (foldable) {
      t.k = t.batch;
      t.a.row_stride = dy.batch;
      t.b.row_stride = x.batch;
      t.a.batch_stride = t.b.batch_stride = 0;
      t.batch = 1;
    }
    tasks.push_back(t);
  }
  return tasks;
}

// Length of a stored row of each operand (its column count).
inline int64_t stored_row_length(const GemmTask& t, char which) {
  switch (which) {
    case 'a': return t.a.transposed ? t.m : t.k;
    case 'b': return t.b.transposed ? t.k : t.n;
    default: return t.n;
  }
}

// The conditions BLAS puts on a task (leading dimension >= row length, 32-bit sizes, C never
// transposed, A and B not both transposed). Returns nullptr when the task is valid.
inline const char* check_blas_task(const GemmTask& t) {
  constexpr int64_t kIntMax = kBlasIntMax;
  if (t.c.transposed) return "C operand may not be transposed";
  if (t.a.transposed && t.b.transposed) return "A and B may not both be transposed";
  if (t.m > kIntMax || t.n > kIntMax || t.k > kIntMax || t.batch > kIntMax) return "GEMM size exceeds 32 bits";
  const MatrixOperand* ops[3] = {&t.a, &t.b, &t.c};
  const char names[3] = {'a', 'b', 'c'};
  for (int i = 0; i < 3; ++i) {
    if (ops[i]->row_stride > kIntMax) return "leading dimension exceeds 32 bits";
    if (ops[i]->row_stride < std::max<int64_t>(1, stored_row_length(t, names[i]))) {
      return "leading dimension smaller than the stored row";
    }
  }
  return nullptr;
}

}  // namespace orca
