// Torch glue of orca_kernels._C: validates inputs, fills the GEMM plan of conv1d_plan.h, allocates
// the accumulation buffers, runs the plan (on the CPU through ATen's GEMM, on CUDA through the
// cuBLAS executor) and registers the ops.
// Autograd formulas and fake (meta) kernels are registered in Python (orca_kernels/strided_conv.py)
// so that they work with symbolic shapes under torch.compile.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "conv1d_plan.h"

#ifdef ORCA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "conv1d_cuda.h"
#endif

namespace orca {
namespace {

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "strided_conv1d: unsupported dtype ", t, " (expected float32, float64, float16 or bfloat16)");
  }
}

at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Integers in error messages are formatted here (std::to_string), not streamed into the message
// that TORCH_CHECK builds: on the GPU machine's build (GCC 13.3, torch 2.11) the two checks that
// streamed an int64 died with SIGSEGV while the checks without integers raised. Until a native
// backtrace (benchmarks/gpu_check.sh) says why, no message streams an integer.
std::string text(int64_t value) { return std::to_string(value); }

std::string text(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == dim, "strided_conv1d: ", name, " must have ", text(dim), " dimensions, got shape ", text(t.sizes()));
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "strided_conv1d: ", name, " has dtype ", t.scalar_type(),
              " but expected ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "strided_conv1d: ", name, " is on ", t.device(), " but expected ",
              like.device());
  dtype_of(t.scalar_type());
}

int64_t output_length(int64_t length_in, int64_t kernel_size, int64_t stride, int64_t padding) {
  TORCH_CHECK(stride >= 1, "strided_conv1d: stride must be >= 1, got ", text(stride));
  TORCH_CHECK(padding >= 0, "strided_conv1d: padding must be >= 0, got ", text(padding));
  TORCH_CHECK(kernel_size >= 1, "strided_conv1d: weight kernel size must be >= 1, got ", text(kernel_size));
  TORCH_CHECK(length_in >= 0, "strided_conv1d: input_length must be >= 0, got ", text(length_in));
  TORCH_CHECK(padding <= max_padding(length_in), "strided_conv1d: padding must be at most ", text(max_padding(length_in)),
              " for T = ", text(length_in), " (T + 2 * padding must fit in 64 bits: at most 2**63 - 1), got ",
              text(padding));
  const int64_t length_out = (length_in + 2 * padding - kernel_size) / stride + 1;
  TORCH_CHECK(length_in + 2 * padding >= kernel_size && length_out >= 1, "strided_conv1d: x has length ",
              text(length_in), ", too short for one window of kernel size ", text(kernel_size), " with padding ",
              text(padding));
  return length_out;
}

// Rows of a [B, T, C] tensor are read as a strided matrix: channel stride 1 and row stride >= C
// (BLAS leading dimension). Anything else (expanded gradients, transposes) is packed first, and so
// is a view whose leading dimension, `row_step` rows (the conv's stride for x), passes 32 bits:
// packed, it is row_step * C, which `check_stride_fits` bounds.
at::Tensor as_row_matrix(const at::Tensor& t, int64_t row_step = 1) {
  const bool channels_unit = t.size(2) <= 1 || t.stride(2) == 1;
  const bool rows_apart = t.size(1) <= 1 || t.stride(1) >= t.size(2);
  const bool step_fits = t.size(1) <= 1 || t.stride(1) <= kBlasIntMax / row_step;
  return channels_unit && rows_apart && step_fits ? t : t.contiguous();
}

// Refuses a stride whose row step stride * C_in passes 32 bits (conv1d_plan.h's max_stride), with
// the message of orca_kernels/strided_conv.py, but only where the plan has GEMMs to run: an empty
// batch, no channels or no window over x compute without them, whatever the stride.
void check_stride_fits(const Conv1dGeometry& g) {
  if (!plan_has_gemms(g)) return;
  TORCH_CHECK(g.stride <= max_stride(g.channels_in), "strided_conv1d: stride must be at most ",
              text(max_stride(g.channels_in)), " for C_in = ", text(g.channels_in),
              " (stride * C_in, the row step of the compiled kernels' GEMMs, must fit in 32 bits: at most "
              "2**31 - 1), got ",
              text(g.stride));
}

RowStrides row_strides(const at::Tensor& t) {
  const int64_t row = t.size(1) <= 1 ? t.size(2) : t.stride(1);
  const int64_t batch = t.size(0) <= 1 ? t.size(1) * row : t.stride(0);
  return {batch, row};
}

// nn.Conv1d's [C_out, C_in, k] repacked as [C_out, k, C_in], so that a chunk of frames is
// contiguous in every row (conv1d_plan.h); the forward and the input gradient share it.
at::Tensor pack_weight(const at::Tensor& weight) { return weight.permute({0, 2, 1}).contiguous(); }

// Output buffers start as NaN when ORCA_KERNELS_POISON_OUTPUTS=1 (the tests set it), so an element
// no kernel writes fails loudly. Accumulation buffers are zero- or bias-initialised by design.
at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  const char* poison = std::getenv("ORCA_KERNELS_POISON_OUTPUTS");
  if (poison != nullptr && std::strcmp(poison, "1") == 0) return at::full(shape, NAN, options);
  return at::empty(shape, options);
}

// The accumulation buffer is the result for fp32/fp64; fp16/bf16 results are rounded from it.
at::Tensor cast_result(const at::Tensor& accumulated, at::ScalarType dtype) {
  if (accumulated.scalar_type() == dtype) return accumulated;
  return new_output(accumulated.sizes(), accumulated.options().dtype(dtype)).copy_(accumulated);
}

// A [rows, cols] matrix of a pass (op(X) when `m.transposed`) as a tensor over the pass's buffer.
at::Tensor operand_view(const void* base, const MatrixOperand& m, int64_t batch_index, int64_t rows, int64_t cols,
                        const at::TensorOptions& options) {
  char* start = static_cast<char*>(const_cast<void*>(base)) +
                (m.offset + batch_index * m.batch_stride) * options.dtype().itemsize();
  const std::vector<int64_t> strides = m.transposed ? std::vector<int64_t>{1, m.row_stride}
                                                    : std::vector<int64_t>{m.row_stride, 1};
  return at::from_blob(start, {rows, cols}, strides, options);
}

// The CPU executor is ATen's own GEMM (MKL / oneDNN): every task becomes addmm_ on views with the
// leading dimensions cuBLAS gets, one call per batch index. fp16/bf16 passes arrive widened to fp32.
void run_pass_cpu(const GemmPass& pass) {
  TORCH_CHECK(pass.ab_dtype == DType::kFloat32 || pass.ab_dtype == DType::kFloat64,
              "strided_conv1d: internal error: the CPU executor takes fp32 or fp64 operands");
  const auto options = at::TensorOptions().dtype(pass.ab_dtype == DType::kFloat64 ? at::kDouble : at::kFloat);
  for (const GemmTask& t : pass.tasks) {
    if (t.m <= 0 || t.n <= 0 || t.k <= 0 || t.batch <= 0) continue;
    for (int64_t bi = 0; bi < t.batch; ++bi) {
      at::Tensor c = operand_view(pass.c, t.c, t.c.batch_stride == 0 ? 0 : bi, t.m, t.n, options);
      c.addmm_(operand_view(pass.a, t.a, bi, t.m, t.k, options), operand_view(pass.b, t.b, bi, t.k, t.n, options));
    }
  }
}

// `context` names the op and its shapes, so that a failure here says which call it was.
void run_pass(const GemmPass& pass, const at::Device& device, const std::string& context) {
  for (const GemmTask& t : pass.tasks) {
    if (t.m <= 0 || t.n <= 0 || t.k <= 0 || t.batch <= 0) continue;
    const char* error = check_blas_task(t);
    TORCH_CHECK(error == nullptr, "strided_conv1d: internal plan error for ", context, ": ", error);
  }
  if (!device.is_cuda()) return run_pass_cpu(pass);
#ifdef ORCA_WITH_CUDA
  c10::cuda::CUDAGuard guard(device);
  const char* error =
      cuda_run_pass(pass, at::cuda::getCurrentCUDABlasHandle(), at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == nullptr, "strided_conv1d: cuBLAS failed for ", context, ": ", error);
#else
  TORCH_CHECK(false, "strided_conv1d: orca_kernels._C was built without CUDA");
#endif
}

// On the CPU, fp16/bf16 operands are widened to fp32 (exact) so that the plan runs on fp32 BLAS
// with fp32 accumulation, as cuBLAS does on the GPU.
at::Tensor cpu_operand(const at::Tensor& t) {
  const bool widen = t.device().is_cpu() && (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16);
  return widen ? t.to(at::kFloat) : t;
}

std::string describe(const char* op, const Conv1dGeometry& g) {
  return std::string(op) + " (x [" + text(g.batch) + ", " + text(g.length_in) + ", " + text(g.channels_in) +
         "], weight [" + text(g.channels_out) + ", " + text(g.channels_in) + ", " + text(g.kernel_size) +
         "], stride " + text(g.stride) + ", padding " + text(g.padding) + ")";
}

at::Tensor strided_conv1d(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          int64_t stride, int64_t padding) {
  check_tensor(x_in, "x", 3, x_in);
  check_tensor(weight, "weight", 3, x_in);
  TORCH_CHECK(weight.size(1) == x_in.size(2), "strided_conv1d: weight has ", text(weight.size(1)),
              " input channels but x has ", text(x_in.size(2)));
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_tensor(*bias, "bias", 1, x_in);
    TORCH_CHECK(bias->size(0) == weight.size(0), "strided_conv1d: bias has ", text(bias->size(0)),
                " elements but weight has ", text(weight.size(0)), " output channels");
  }
  const Conv1dGeometry g{x_in.size(0), x_in.size(1), x_in.size(2),
                         output_length(x_in.size(1), weight.size(2), stride, padding),
                         weight.size(0), weight.size(2), stride, padding};
  check_stride_fits(g);
  const auto options = x_in.options().dtype(accumulation_type(x_in.scalar_type()));
  // A fresh buffer in both cases: expand(...).contiguous() of a [1, 1, C] shape would alias bias.
  at::Tensor out = at::empty({g.batch, g.length_out, g.channels_out}, options);
  if (has_bias) {
    out.copy_(bias->expand({g.batch, g.length_out, g.channels_out}));
  } else {
    out.zero_();
  }
  if (out.numel() > 0 && g.channels_in > 0) {
    const at::Tensor x = as_row_matrix(cpu_operand(x_in), stride);
    const at::Tensor w = pack_weight(cpu_operand(weight));
    run_pass({forward_tasks(g, row_strides(x)), dtype_of(x.scalar_type()), x.data_ptr(), w.data_ptr(), out.data_ptr()},
             x.device(), describe("strided_conv1d", g));
  }
  return cast_result(out, x_in.scalar_type());
}

at::Tensor strided_conv1d_grad_input(const at::Tensor& grad_out_in, const at::Tensor& weight, int64_t input_length,
                                     int64_t stride, int64_t padding) {
  check_tensor(grad_out_in, "grad_out", 3, grad_out_in);
  check_tensor(weight, "weight", 3, grad_out_in);
  const int64_t length_out = output_length(input_length, weight.size(2), stride, padding);
  TORCH_CHECK(grad_out_in.size(1) == length_out && grad_out_in.size(2) == weight.size(0),
              "strided_conv1d: grad_out has shape ", text(grad_out_in.sizes()), " but the convolution gives [B, ",
              text(length_out), ", ", text(weight.size(0)), "]");
  const Conv1dGeometry g{grad_out_in.size(0), input_length, weight.size(1), length_out,
                         weight.size(0), weight.size(2), stride, padding};
  check_stride_fits(g);
  at::Tensor grad_x = at::zeros({g.batch, g.length_in, g.channels_in},
                                grad_out_in.options().dtype(accumulation_type(grad_out_in.scalar_type())));
  if (grad_x.numel() > 0 && g.channels_out > 0) {
    const at::Tensor grad_out = as_row_matrix(cpu_operand(grad_out_in));
    const at::Tensor w = pack_weight(cpu_operand(weight));
    run_pass({grad_input_tasks(g, row_strides(grad_out)), dtype_of(grad_out.scalar_type()), grad_out.data_ptr(),
              w.data_ptr(), grad_x.data_ptr()},
             grad_out.device(), describe("strided_conv1d_grad_input", g));
  }
  return cast_result(grad_x, grad_out_in.scalar_type());
}

at::Tensor strided_conv1d_grad_weight(const at::Tensor& grad_out_in, const at::Tensor& x_in, int64_t kernel_size,
                                      int64_t stride, int64_t padding) {
  check_tensor(grad_out_in, "grad_out", 3, grad_out_in);
  check_tensor(x_in, "x", 3, grad_out_in);
  const int64_t length_out = output_length(x_in.size(1), kernel_size, stride, padding);
  TORCH_CHECK(grad_out_in.size(0) == x_in.size(0) && grad_out_in.size(1) == length_out,
              "strided_conv1d: grad_out has shape ", text(grad_out_in.sizes()), " but the convolution gives [",
              text(x_in.size(0)), ", ", text(length_out), ", C_out]");
  const Conv1dGeometry g{x_in.size(0), x_in.size(1), x_in.size(2), length_out,
                         grad_out_in.size(2), kernel_size, stride, padding};
  check_stride_fits(g);
  at::Tensor packed = at::zeros({g.channels_out, g.kernel_size, g.channels_in},
                                x_in.options().dtype(accumulation_type(x_in.scalar_type())));
  if (packed.numel() > 0 && g.batch > 0) {
    const at::Tensor grad_out = as_row_matrix(cpu_operand(grad_out_in));
    const at::Tensor x = as_row_matrix(cpu_operand(x_in), stride);
    run_pass({grad_weight_tasks(g, row_strides(grad_out), row_strides(x)), dtype_of(x.scalar_type()),
              grad_out.data_ptr(), x.data_ptr(), packed.data_ptr()},
             x.device(), describe("strided_conv1d_grad_weight", g));
  }
  return new_output({g.channels_out, g.channels_in, g.kernel_size}, x_in.options()).copy_(packed.permute({0, 2, 1}));
}

}  // namespace
}  // namespace orca

TORCH_LIBRARY(orca_kernels, m) {
  m.def("strided_conv1d(Tensor x, Tensor weight, Tensor? bias, int stride, int padding) -> Tensor");
  m.def("strided_conv1d_grad_input(Tensor grad_out, Tensor weight, SymInt input_length, int stride, int padding) -> Tensor");
  m.def("strided_conv1d_grad_weight(Tensor grad_out, Tensor x, SymInt kernel_size, int stride, int padding) -> Tensor");
}

TORCH_LIBRARY_IMPL(orca_kernels, CPU, m) {
  m.impl("strided_conv1d", &orca::strided_conv1d);
  m.impl("strided_conv1d_grad_input", &orca::strided_conv1d_grad_input);
  m.impl("strided_conv1d_grad_weight", &orca::strided_conv1d_grad_weight);
}

#ifdef ORCA_WITH_CUDA
TORCH_LIBRARY_IMPL(orca_kernels, CUDA, m) {
  m.impl("strided_conv1d", &orca::strided_conv1d);
  m.impl("strided_conv1d_grad_input", &orca::strided_conv1d_grad_input);
  m.impl("strided_conv1d_grad_weight", &orca::strided_conv1d_grad_weight);
}
#define ORCA_CUDA_FLAG 1
#else
#define ORCA_CUDA_FLAG 0
#endif

// Importing orca_kernels._C loads this library, whose static initialisers register the ops above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "orca_kernels compiled ops (torch.ops.orca_kernels)",
                                   -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", ORCA_CUDA_FLAG) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
