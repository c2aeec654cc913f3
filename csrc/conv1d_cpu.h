// CPU executor of the GEMM plan in conv1d_plan.h (plain C++, no torch headers).
#pragma once

#include <cstdint>

#include "conv1d_plan.h"

namespace orca {

// Work items of one task: one per row of C and per distinct C batch (the glue parallelises over them).
int64_t cpu_task_items(const GemmTask& task);

// Runs items [begin, end) of `task`: reads A and B as `ab_dtype` (bf16/fp16 are widened to fp32),
// accumulates in fp32 (fp64 for fp64 inputs) and adds the result into C, which holds that type.
// Rows of C are disjoint between items, so distinct ranges may run concurrently.
void cpu_run_task_items(const GemmTask& task, DType ab_dtype, const void* a, const void* b, void* c,
                        int64_t begin, int64_t end);

}  // namespace orca
