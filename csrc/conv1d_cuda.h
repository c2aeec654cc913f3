// CUDA executor of the GEMM plan in conv1d_plan.h (no torch headers).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "conv1d_plan.h"

namespace orca {

// Enqueues every task of `pass` on `stream` through cuBLAS (tensor cores for fp16/bf16, fp32
// accumulation into the fp32 C; fp64 stays fp64). Returns nullptr on success, else a message.
const char* cuda_run_pass(const GemmPass& pass, cublasHandle_t handle, cudaStream_t stream);

}  // namespace orca
