/* kvsplit-mlx's own MLX primitives (C++ `mlx::core::Primitive` subclasses, MLX's documented
 * extension point), exposed with mlx-c's calling convention: results through `res`, 0 on
 * success. On failure the message is kept per thread for `kvsplit_ext_last_error`.
 *
 * They run on MLX's CPU backend only; their `eval_gpu` refuses, and callers route GPU work to
 * MLX ops or to the fused CUDA kernels instead. */
#ifndef KVSPLIT_EXT_H
#define KVSPLIT_EXT_H

#include "mlx/c/array.h"
#include "mlx/c/stream.h"

#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The message of this thread's last failed call ("" if none). */
const char* kvsplit_ext_last_error(void);

/* How many threads the CPU kernels use (starts the pool). */
int kvsplit_ext_cpu_threads(void);

/* The engine's CPU options: `threads` for the kernels' pool (0: one per core), and whether to
 * force the baseline build of the kernels instead of the AVX2 one. The thread count is fixed
 * when the pool starts (first kernel call); asking for another count afterwards fails. */
int kvsplit_ext_configure(int threads, bool force_generic);
// Puts OpenBLAS on its kernels for this CPU where its own detection fell back to Prescott
// (csrc/blas.cpp); once per process. Returns which kernels MLX's CPU matmuls use ("" if the
// BLAS is not OpenBLAS).
const char* kvsplit_blas_select(void);

/* y = x W^T for an MLX affine-quantized W: `x` [..., K] float32, `w` [N, K*bits/32] uint32,
 * `scales`/`biases` [N, K/group] float32 or float16; y [..., N] float32. bits 2, 3, 4, 6 or 8. Meant
 * for a few rows of x (decode); it reads W once per call whatever the row count. */
int kvsplit_cpu_quantized_matvec(
    mlx_array* res,
    const mlx_array x,
    const mlx_array w,
    const mlx_array scales,
    const mlx_array biases,
    int group_size,
    int bits,
    const mlx_stream s);

/* dequantize(W) as float32 [N, K] (natural element order, as MLX's dequantize): `w`
 * [N, K*bits/32] uint32, `scales`/`biases` [N, K/group] float32 or float16. For many-row
 * products, which then go to BLAS. bits 2, 3, 4, 6 or 8. */
int kvsplit_cpu_dequantize(
    mlx_array* res,
    const mlx_array w,
    const mlx_array scales,
    const mlx_array biases,
    int group_size,
    int bits,
    const mlx_stream s);

/* Every attention entry point below takes `softcap`: 0 for plain scores, else each scaled score s
 * becomes softcap * tanh(s / softcap) before the softmax (Gemma 2); negative or non-finite is an
 * error. */

/* The decode step of a packed per-token cache in one op: the new token's `k_new`/`v_new`
 * (float32 [B, Hkv, 1, D]) are quantized as MLX's `quantize` does (codes and scales bit for bit)
 * into row `slot` of the whole cache buffers (in place; shapes as in
 * kvsplit_cpu_quantized_decode_attention, scales and biases all float16 or all float32), then
 * `q` (float32 [B, Hq, 1, D], already scaled) attends over tokens 0..slot. Returns
 * [B, Hq, 1, D] float32. */
int kvsplit_cpu_quantized_decode_step(mlx_array* res, const mlx_array q, const mlx_array k_new, const mlx_array v_new,
                                      const mlx_array k_w, const mlx_array k_scales, const mlx_array k_biases,
                                      const mlx_array v_w, const mlx_array v_scales, const mlx_array v_biases, int slot,
                                      int k_group, int k_bits, int v_group, int v_bits, float softcap,
                                      const mlx_stream s);

/* The decode step of a cache with per-channel keys in one op: the new token's `k_new`/`v_new`
 * (float32 [B, Hkv, 1, D], unrotated) are Hadamard-rotated where `rot` says (bit 0 keys, bit 1
 * values) and written into row `row` of the whole float tail buffers `tail_k`/`tail_v`
 * (float32 or float16 [B, Hkv, cap, D], in place, rounded as astype rounds); then `q` (float32
 * [B, Hq, 1, D], already scaled, unrotated) attends over the sink rows `sink_k`/`sink_v`
 * (optional, float32 or float16 [B, Hkv, NS, D], already in the stored frame), the first `len`
 * tokens of the packed body (per-channel keys and per-token values, shapes as in
 * kvsplit_cpu_quantized_decode_attention; `ranges` as there, empty for [0, len)) and tail rows
 * 0..row, in the keys' frame; the output leaves the values' frame. Returns [B, Hq, 1, D]
 * float32. */
int kvsplit_cpu_channel_decode_step(mlx_array* res, const mlx_array q, const mlx_array k_new, const mlx_array v_new,
                                    const mlx_array k_w, const mlx_array k_scales, const mlx_array k_biases,
                                    const mlx_array v_w, const mlx_array v_scales, const mlx_array v_biases,
                                    const mlx_array tail_k, const mlx_array tail_v, const mlx_array sink_k,
                                    const mlx_array sink_v, int len, int row, int k_group, int k_bits, int v_group,
                                    int v_bits, int rot, float softcap, const int* ranges, int n_ranges,
                                    const mlx_stream s);

/* Decode attention over a 16-bit dense cache: `q` [B, Hq, L, D] float32 (already multiplied by
 * the softmax scale), `k`/`v` whole float16 cache buffers [B, Hkv, cap, D] (any strides but the
 * last), of which the first `len` tokens are read, each widened once per step (no mask; Hq a
 * multiple of Hkv; D a multiple of 8). `causal`: a prefill chunk whose own tokens are the last
 * L of the `len` (query i sees tokens 0..=len - L + i). Returns [B, Hq, L, D] float32. */
int kvsplit_cpu_dense_decode_attention(mlx_array* res, const mlx_array q, const mlx_array k, const mlx_array v, int len,
                                       bool causal, float softcap, const mlx_stream s);

/* Decode attention over a packed per-token cache, never widening it beyond registers.
 * `q` [B, Hq, L, D] float32 (already multiplied by the softmax scale); keys and values are
 * whole cache buffers `*_w` [B, Hkv, cap, D*bits/32] uint32 with `*_scales`/`*_biases`
 * [B, Hkv, cap, D/group] float16 or float32, of which the first `len` tokens are read. Every
 * query sees every one of them (no mask); Hq is a multiple of Hkv (grouped-query attention).
 * With `k_per_channel` the keys are stored transposed (KIVI): `k_w` [B, Hkv, D, cap*bits/32]
 * with scales/biases [B, Hkv, D, cap/group], groups of `k_group` tokens, `len` a multiple of it.
 * `tail_k`/`tail_v` (float32 [B, Hkv, n, D], any strides but the last; ctx NULL for none) are
 * float tokens every query also sees, after the packed ones.
 * `causal` (per-token keys, no tail, L <= len): a prefill chunk whose own tokens are the last
 * L of the `len`; query i sees tokens 0..=len - L + i.
 * `ranges` (not causal; n_ranges pairs a, b, or NULL and 0): the body slots [a, b) read
 * instead of [0, len) (a rotating cache's visible window; with per-channel keys b a multiple
 * of k_group, a anywhere, the rest of a's group masked).
 * Returns [B, Hq, L, D] float32. Bits 2, 3, 4, 6 or 8 for each of K and V. */
int kvsplit_cpu_quantized_decode_attention(
    mlx_array* res,
    const mlx_array q,
    const mlx_array k_w,
    const mlx_array k_scales,
    const mlx_array k_biases,
    const mlx_array v_w,
    const mlx_array v_scales,
    const mlx_array v_biases,
    int len,
    int k_group,
    int k_bits,
    int v_group,
    int v_bits,
    bool k_per_channel,
    const mlx_array tail_k,
    const mlx_array tail_v,
    bool causal,
    float softcap,
    const int* ranges,
    int n_ranges,
    const mlx_stream s);

/* Decode attention of S sequences (q [S, Hq, 1, D] float32, scaled) over a block pool: packed
   K/V [blocks, Hkv, BLOCK, D*bits/32] with f16/f32 scales and biases [blocks, Hkv, BLOCK, D/group],
   and table int32 [S, 1 + max_blocks]: each row a sequence's length, then its block ids.
   k_per_channel: keys [blocks, Hkv, D, BLOCK*bits/32] in groups of k_group tokens, and each
   sequence's last len % k_group tokens in the float tails tail_k/tail_v [S, Hkv, n, D], after
   `lead` sink tokens every sequence keeps there (not counted in its length). */
int kvsplit_cpu_paged_decode_attention(
    mlx_array* res,
    const mlx_array q,
    const mlx_array k_w,
    const mlx_array k_scales,
    const mlx_array k_biases,
    const mlx_array v_w,
    const mlx_array v_scales,
    const mlx_array v_biases,
    const mlx_array table,
    int k_group,
    int k_bits,
    int v_group,
    int v_bits,
    bool k_per_channel,
    const mlx_array tail_k,
    const mlx_array tail_v,
    int lead,
    float softcap,
    const mlx_stream s);

/* RMSNorm over the last axis: x [..., H] float32 (any strides), optional `weight` [H]
 * float32 (pass an empty mlx_array, ctx NULL, for none). Returns a contiguous float32 array. */
int kvsplit_cpu_rms_norm(mlx_array* res, const mlx_array x, const mlx_array weight, float eps, const mlx_stream s);

/* Rotary embedding with MLX's `fast::rope` semantics: x [..., L, D] float32 (any strides),
 * positions offset..offset+L-1 times `scale`, the first `dims` features rotated (halves, or
 * interleaved pairs when `traditional`), inverse frequencies base^(-2i/dims) or 1/freqs[i]
 * when `freqs` [dims/2] is given (ctx NULL for none). Returns a contiguous float32 array. */
int kvsplit_cpu_rope(
    mlx_array* res,
    const mlx_array x,
    int dims,
    bool traditional,
    float base,
    float scale,
    int offset,
    const mlx_array freqs,
    const mlx_stream s);

#ifdef __cplusplus
}
#endif

#endif
