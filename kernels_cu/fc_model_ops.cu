// The benchmark model's elementwise kernels (flashcomm_cupy/model/ops.py): RMSNorm, SiLU-and-
// multiply, causal masked softmax.  One module per element type, chosen by FC_MODEL_DT
// (0 float16, 1 bfloat16, 2 float32: flashcomm_cupy.dtypes.KERNEL_DTYPE_CODE); loaded through
// flashcomm_cupy/backends/flash/kernels.py (read_source), compiled as CuPy compiles any
// RawModule (its default flush-to-zero included, as when this source was a Python string).
#if FC_MODEL_DT == 0
#include <cuda_fp16.h>
typedef __half T;
__device__ __forceinline__ float to_f(T v) { return __half2float(v); }
__device__ __forceinline__ T from_f(float v) { return __float2half_rn(v); }
#elif FC_MODEL_DT == 1
#include <cuda_bf16.h>
typedef __nv_bfloat16 T;
__device__ __forceinline__ float to_f(T v) { return __bfloat162float(v); }
__device__ __forceinline__ T from_f(float v) { return __float2bfloat16_rn(v); }
#elif FC_MODEL_DT == 2
typedef float T;
__device__ __forceinline__ float to_f(T v) { return v; }
__device__ __forceinline__ T from_f(float v) { return v; }
#else
#error "FC_MODEL_DT must be 0 (float16), 1 (bfloat16) or 2 (float32)"
#endif
// Block-wide max or sum; every thread gets the result.
__device__ float block_reduce(float v, bool take_max) {
    __shared__ float shm[32];
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = take_max ? fmaxf(v, w) : v + w;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = (lane < warps) ? shm[lane] : (take_max ? -3.402823466e38f : 0.f);
        for (int o = 16; o > 0; o >>= 1) {
            float w = __shfl_xor_sync(0xffffffffu, v, o);
            v = take_max ? fmaxf(v, w) : v + w;
        }
        if (lane == 0) shm[0] = v;
    }
    __syncthreads();
    const float r = shm[0];
    __syncthreads();  // the next call may overwrite shm
    return r;
}

extern "C" __global__ void rms_norm(const T* x, const T* w, T* y, int cols, float eps) {
    const long long row = blockIdx.x;
    const T* xr = x + row * cols;
    T* yr = y + row * cols;
    float ss = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) { float v = to_f(xr[j]); ss += v * v; }
    const float inv = rsqrtf(block_reduce(ss, false) / cols + eps);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) yr[j] = from_f((to_f(xr[j]) * inv) * to_f(w[j]));
}

extern "C" __global__ void silu_mul(const T* gu, T* y, long long total, int width) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / width, col = i - row * width;
        const float g = to_f(gu[row * 2 * width + col]);
        const float u = to_f(gu[row * 2 * width + width + col]);
        y[i] = from_f(g / (1.f + __expf(-g)) * u);
    }
}

extern "C" __global__ void masked_softmax(T* s, int keys, int queries, float scale) {
    const long long row = blockIdx.x;
    T* sr = s + row * keys;
    const int visible = (int)(row % queries) + (keys - queries) + 1;
    float m = -3.402823466e38f;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) m = fmaxf(m, to_f(sr[j]) * scale);
    m = block_reduce(m, true);
    float sum = 0.f;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) sum += __expf(to_f(sr[j]) * scale - m);
    const float inv = 1.f / block_reduce(sum, false);
    for (int j = threadIdx.x; j < keys; j += blockDim.x)
        sr[j] = from_f(j < visible ? __expf(to_f(sr[j]) * scale - m) * inv : 0.f);
}
