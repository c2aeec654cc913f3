// CUDA executor of the GEMM plan: each task is one cublasGemmStridedBatchedEx call on strided
// views of the activations (see conv1d_plan.h for why GEMMs over views). Compiled by nvcc without
// torch headers; the glue passes the handle and the current stream.
#include "conv1d_cuda.h"

namespace orca {
namespace {

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::kFloat64: return CUDA_R_64F;
    case DType::kFloat16: return CUDA_R_16F;
    case DType::kBFloat16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

size_t element_size(DType t) {
  switch (t) {
    case DType::kFloat64: return 8;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    default: return 4;
  }
}

cublasOperation_t op_of(const MatrixOperand& m) { return m.transposed ? CUBLAS_OP_T : CUBLAS_OP_N; }

}  // namespace

const char* cuda_run_pass(const GemmPass& pass, cublasHandle_t handle, cudaStream_t stream) {
  if (cublasSetStream(handle, stream) != CUBLAS_STATUS_SUCCESS) return "cublasSetStream failed";
  const bool fp64 = pass.ab_dtype == DType::kFloat64;
  const cudaDataType_t ab_type = cuda_type(pass.ab_dtype);
  const cudaDataType_t c_type = fp64 ? CUDA_R_64F : CUDA_R_32F;
  const cublasComputeType_t compute = fp64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
  const double one_d = 1.0;
  const float one_f = 1.0f;
  const void* one = fp64 ? static_cast<const void*>(&one_d) : static_cast<const void*>(&one_f);
  const size_t ab_size = element_size(pass.ab_dtype), c_size = fp64 ? 8 : 4;
  const char* a_base = static_cast<const char*>(pass.a);
  const char* b_base = static_cast<const char*>(pass.b);
  char* c_base = static_cast<char*>(pass.c);

  for (const GemmTask& t : pass.tasks) {
    if (t.m <= 0 || t.n <= 0 || t.k <= 0 || t.batch <= 0) continue;
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const bool sum_batches = t.c.batch_stride == 0 && t.batch > 1;
    const int launches = sum_batches ? static_cast<int>(t.batch) : 1;
    const int batch_count = sum_batches ? 1 : static_cast<int>(t.batch);
    for (int launch = 0; launch < launches; ++launch) {
      const void* a = a_base + (t.a.offset + launch * t.a.batch_stride) * ab_size;
      const void* b = b_base + (t.b.offset + launch * t.b.batch_stride) * ab_size;
      void* c = c_base + t.c.offset * c_size;
      const cublasStatus_t status = cublasGemmStridedBatchedEx(
          handle, op_of(t.b), op_of(t.a), static_cast<int>(t.n), static_cast<int>(t.m), static_cast<int>(t.k),
          one, b, ab_type, static_cast<int>(t.b.row_stride), t.b.batch_stride, a, ab_type,
          static_cast<int>(t.a.row_stride), t.a.batch_stride, one, c, c_type, static_cast<int>(t.c.row_stride),
          t.c.batch_stride, batch_count, compute, CUBLAS_GEMM_DEFAULT);
      if (status != CUBLAS_STATUS_SUCCESS) return cublasGetStatusString(status);
    }
  }
  return nullptr;
}

}  // namespace orca
