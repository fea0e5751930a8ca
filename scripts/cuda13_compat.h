/*
 * cuda13_compat.h: lets StarPU 1.3's CUDA driver compile and link against CUDA 13's cuBLAS.
 *
 * scripts/build-starpu-cuda.sh force-includes it (gcc -include) into every C file of libstarpu,
 * at `make` time only: configure's own test programs must not see it.
 *
 * Two things changed in cuBLAS 13 that StarPU 1.3 trips over:
 *   - cublas.h (the legacy API) and cublas_v2.h refuse to be included in the same translation
 *     unit, and StarPU's src/drivers/cuda files include both;
 *   - the legacy entry points cublasInit, cublasShutdown and cublasSetKernelStream are no longer
 *     exported by libcublas, but StarPU still calls them.
 * StarPU does its real cuBLAS work through v2 handles (cublasCreate / cublasSetStream per worker),
 * so here the v2 header is included first, cublas.h's include guard is defined so that a later
 * `#include <cublas.h>` is empty, and the three legacy calls become inline functions that do
 * nothing and report success. cublas.h's `cublasStatus` spelling is kept as a typedef.
 */
#ifndef LOTUS_CUDA13_COMPAT_H
#define LOTUS_CUDA13_COMPAT_H

#if !defined(__ASSEMBLER__)

#include <cublas_v2.h>

#ifndef CUBLAS_H_
#define CUBLAS_H_ 1 /* cublas.h's guard: the legacy header becomes a no-op */
#endif

typedef cublasStatus_t cublasStatus;

static inline cublasStatus_t cublasInit(void)
{
    return CUBLAS_STATUS_SUCCESS;
}

static inline cublasStatus_t cublasShutdown(void)
{
    return CUBLAS_STATUS_SUCCESS;
}

static inline cublasStatus_t cublasSetKernelStream(cudaStream_t stream)
{
    (void)stream; /* only legacy-API calls used this stream; nothing here makes them */
    return CUBLAS_STATUS_SUCCESS;
}

#endif /* !__ASSEMBLER__ */

#endif /* LOTUS_CUDA13_COMPAT_H */
