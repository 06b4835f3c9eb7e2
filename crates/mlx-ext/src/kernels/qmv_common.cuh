// Helpers of qmv.cu (the header MLX puts before a custom kernel's generated function).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// Eight consecutive activations as f32, in one 16-byte load for 16-bit types (two for f32).
__device__ __forceinline__ void qmv_load8(const __half* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void qmv_load8(const __nv_bfloat16* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void qmv_load8(const float* p, float* out) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}
__device__ __forceinline__ float qmv_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float qmv_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float qmv_to_float(float x) { return x; }
template <typename T> __device__ __forceinline__ T qmv_from_float(float x);
template <> __device__ __forceinline__ float qmv_from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half qmv_from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 qmv_from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
