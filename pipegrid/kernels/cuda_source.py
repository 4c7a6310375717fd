"""CUDA C++ source of the fused flat-buffer kernels, compiled by CuPy's NVRTC.

Kept apart from the Python launch code so each file reads on its own; no headers
are included (fp16/bf16 conversions are written out) so NVRTC needs no include path.
"""

# Every kernel walks a "segment table" in device memory, int64 rows of n entries:
#   starts[n]  where segment s begins in the iteration space (non-decreasing, starts[0] = 0)
#   ptrs[n]    device address of tensor s
#   counts[n]  units of tensor s (bytes or elements); the rest of the slot, up to
#              starts[s + 1], is alignment padding
#   codes[n]   dtype code of tensor s (1 f16, 2 bf16, 3 f32, 4 f64)
# A block owns tiles of the iteration space (grid-stride); thread 0 binary-searches the
# first and last segment of its tile, and each thread narrows that range for its unit,
# so thousands of tensors cost one launch and one table, not one launch each.
CUDA_SOURCE = r"""
typedef long long i64;
typedef unsigned long long u64;

#define F16 1
#define BF16 2
#define F32 3
#define F64 4
#define UNROLL 4

__device__ __forceinline__ i64 min64(i64 a, i64 b) { return a < b ? a : b; }

__device__ __forceinline__ float half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short float_to_half(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf16_to_float(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

__device__ __forceinline__ unsigned short float_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN, as torch's CPU path writes it
    u += 0x7fffu + ((u >> 16) & 1u);                     // round to nearest, ties to even
    return (unsigned short)(u >> 16);
}

// 16-bit outputs go through float, as torch's casts do (double -> float -> half).
template <typename C>
__device__ __forceinline__ C load_as(const void* p, i64 i, int code) {
    switch (code) {
        case F16: return (C)half_to_float(((const unsigned short*)p)[i]);
        case BF16: return (C)bf16_to_float(((const unsigned short*)p)[i]);
        case F32: return (C)((const float*)p)[i];
        default: return (C)((const double*)p)[i];
    }
}

template <typename C>
__device__ __forceinline__ void store_as(void* p, i64 i, int code, C v) {
    switch (code) {
        case F16: ((unsigned short*)p)[i] = float_to_half((float)v); break;
        case BF16: ((unsigned short*)p)[i] = float_to_bf16((float)v); break;
        case F32: ((float*)p)[i] = (float)v; break;
        default: ((double*)p)[i] = (double)v; break;
    }
}

__device__ __forceinline__ bool finite_at(const void* p, i64 i, int code) {
    switch (code) {
        case F16: return (((const unsigned short*)p)[i] & 0x7c00u) != 0x7c00u;
        case BF16: return (((const unsigned short*)p)[i] & 0x7f80u) != 0x7f80u;
        case F32: return (((const unsigned int*)p)[i] & 0x7f800000u) != 0x7f800000u;
        default: return (((const u64*)p)[i] & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
    }
}

// Last segment s in [lo, hi] with starts[s] <= pos; zero-size segments share their
// start with the next one, so they are never picked for a unit inside the buffer.
__device__ __forceinline__ int find_slot(const i64* starts, int lo, int hi, i64 pos) {
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (starts[mid] <= pos) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// Segment range of the tile [t0, t1), shared by the block.
__device__ __forceinline__ void tile_slots(const i64* starts, int n, i64 t0, i64 t1,
                                           int* lo, int* hi) {
    __shared__ int s_lo, s_hi;
    __syncthreads();  // the previous tile is done reading s_lo / s_hi
    if (threadIdx.x == 0) {
        s_lo = find_slot(starts, 0, n - 1, t0);
        s_hi = find_slot(starts, s_lo, n - 1, t1 - 1);
    }
    __syncthreads();
    *lo = s_lo;
    *hi = s_hi;
}

union Vec16 {
    uint4 v;
    unsigned char b[16];
};

// Units are 16 bytes of the flat buffer (total_bytes is a multiple of 16).
extern "C" __global__ void pack_bytes(const i64* table, int n, i64 total_bytes,
                                      unsigned char* flat) {
    const i64 *starts = table, *ptrs = table + n, *counts = table + 2 * n;
    const i64 tile = (i64)blockDim.x * 16 * UNROLL;
    for (i64 t0 = (i64)blockIdx.x * tile; t0 < total_bytes; t0 += (i64)gridDim.x * tile) {
        i64 t1 = min64(t0 + tile, total_bytes);
        int lo, hi;
        tile_slots(starts, n, t0, t1, &lo, &hi);
        for (int k = 0; k < UNROLL; ++k) {
            i64 pos = t0 + ((i64)k * blockDim.x + threadIdx.x) * 16;
            if (pos >= t1) break;
            int s = find_slot(starts, lo, hi, pos);
            i64 off = pos - starts[s], count = counts[s];
            const unsigned char* src = (const unsigned char*)ptrs[s] + off;
            Vec16 u;
            if (off + 16 <= count && (((u64)src) & 15) == 0) {
                u.v = *(const uint4*)src;
            } else {  // tail, padding or a misaligned view
                #pragma unroll
                for (int j = 0; j < 16; ++j) u.b[j] = (off + j < count) ? src[j] : 0;
            }
            *(uint4*)(flat + pos) = u.v;
        }
    }
}

// Loads first, then stores: UNROLL independent 16-byte reads of the flat buffer are in
// flight per thread before the first write. Interleaved (load k, store k, load k + 1, ...)
// the compiler must keep that order, since a destination address read from the table may
// alias the buffer, and each thread then waits out one memory latency per 16 bytes. That
// is a guess at why the interleaved version reached 68% of copy bandwidth on an H200
// (pack_bytes: 94%), written without a GPU: benchmarks/kernel_bandwidth.py says whether
// it helped, and kernels.backend=auto takes torch's path wherever this one is slower.
// The reads are issued before tile_slots, too: their addresses need no table, so their
// latency overlaps thread 0's binary search and the two barriers (pack_bytes cannot do
// this: its sources come from the table). Also unmeasured on a GPU.
extern "C" __global__ void unpack_bytes(const i64* table, int n, i64 total_bytes,
                                        const unsigned char* flat) {
    const i64 *starts = table, *ptrs = table + n, *counts = table + 2 * n;
    const i64 tile = (i64)blockDim.x * 16 * UNROLL;
    for (i64 t0 = (i64)blockIdx.x * tile; t0 < total_bytes; t0 += (i64)gridDim.x * tile) {
        i64 t1 = min64(t0 + tile, total_bytes);
        Vec16 u[UNROLL];
        #pragma unroll
        for (int k = 0; k < UNROLL; ++k) {  // total_bytes is a multiple of 16: pos < t1 is a whole unit
            i64 pos = t0 + ((i64)k * blockDim.x + threadIdx.x) * 16;
            if (pos < t1) u[k].v = *(const uint4*)(flat + pos);
        }
        int lo, hi;
        tile_slots(starts, n, t0, t1, &lo, &hi);
        #pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            i64 pos = t0 + ((i64)k * blockDim.x + threadIdx.x) * 16;
            if (pos >= t1) break;
            int s = find_slot(starts, lo, hi, pos);
            i64 off = pos - starts[s], count = counts[s];
            if (off >= count) continue;  // padding
            unsigned char* dst = (unsigned char*)ptrs[s] + off;
            if (off + 16 <= count && (((u64)dst) & 15) == 0) {
                *(uint4*)dst = u[k].v;
            } else {
                int m = (int)min64(16, count - off);
                for (int j = 0; j < m; ++j) dst[j] = u[k].b[j];
            }
        }
    }
}

// Units are elements of the flat dtype. Each tensor is computed in float, or in
// double when it or the flat buffer is float64, and rounded once into the buffer.
extern "C" __global__ void pack_cast(const i64* table, int n, i64 total, void* flat,
                                     int flat_code, int has_scale, double scale_value,
                                     u64 scale_ptr) {
    const i64 *starts = table, *ptrs = table + n, *counts = table + 2 * n, *codes = table + 3 * n;
    const double scale_d = scale_ptr ? *(const double*)scale_ptr : scale_value;
    const float scale_f = (float)scale_d;
    const i64 tile = (i64)blockDim.x * UNROLL;
    for (i64 t0 = (i64)blockIdx.x * tile; t0 < total; t0 += (i64)gridDim.x * tile) {
        i64 t1 = min64(t0 + tile, total);
        int lo, hi;
        tile_slots(starts, n, t0, t1, &lo, &hi);
        for (int k = 0; k < UNROLL; ++k) {
            i64 e = t0 + (i64)k * blockDim.x + threadIdx.x;
            if (e >= t1) break;
            int s = find_slot(starts, lo, hi, e);
            i64 off = e - starts[s];
            int code = (int)codes[s];
            const void* src = (const void*)ptrs[s];
            bool inside = off < counts[s];
            if (code == F64 || flat_code == F64) {
                double v = inside ? load_as<double>(src, off, code) : 0.0;
                if (has_scale && inside) v *= scale_d;
                store_as<double>(flat, e, flat_code, v);
            } else {
                float v = inside ? load_as<float>(src, off, code) : 0.0f;
                if (has_scale && inside) v *= scale_f;
                store_as<float>(flat, e, flat_code, v);
            }
        }
    }
}

extern "C" __global__ void unpack_cast(const i64* table, int n, i64 total, const void* flat,
                                       int flat_code) {
    const i64 *starts = table, *ptrs = table + n, *counts = table + 2 * n, *codes = table + 3 * n;
    const i64 tile = (i64)blockDim.x * UNROLL;
    for (i64 t0 = (i64)blockIdx.x * tile; t0 < total; t0 += (i64)gridDim.x * tile) {
        i64 t1 = min64(t0 + tile, total);
        int lo, hi;
        tile_slots(starts, n, t0, t1, &lo, &hi);
        for (int k = 0; k < UNROLL; ++k) {
            i64 e = t0 + (i64)k * blockDim.x + threadIdx.x;
            if (e >= t1) break;
            int s = find_slot(starts, lo, hi, e);
            i64 off = e - starts[s];
            if (off >= counts[s]) continue;  // padding
            int code = (int)codes[s];
            void* dst = (void*)ptrs[s];
            if (code == F64 || flat_code == F64) {
                store_as<double>(dst, off, code, load_as<double>(flat, e, flat_code));
            } else {
                store_as<float>(dst, off, code, load_as<float>(flat, e, flat_code));
            }
        }
    }
}

// Per-block partial sums of squares: float64 tensors accumulate in double, all others
// in float. A fixed grid and a fixed reduction order make the result deterministic.
extern "C" __global__ void sum_squares(const i64* table, int n, i64 total,
                                       float* partial_f, double* partial_d) {
    const i64 *starts = table, *ptrs = table + n, *codes = table + 3 * n;
    const i64 tile = (i64)blockDim.x * UNROLL;
    float acc_f = 0.0f;
    double acc_d = 0.0;
    for (i64 t0 = (i64)blockIdx.x * tile; t0 < total; t0 += (i64)gridDim.x * tile) {
        i64 t1 = min64(t0 + tile, total);
        int lo, hi;
        tile_slots(starts, n, t0, t1, &lo, &hi);
        for (int k = 0; k < UNROLL; ++k) {
            i64 e = t0 + (i64)k * blockDim.x + threadIdx.x;
            if (e >= t1) break;
            int s = find_slot(starts, lo, hi, e);
            int code = (int)codes[s];
            if (code == F64) {
                double v = load_as<double>((const void*)ptrs[s], e - starts[s], code);
                acc_d += v * v;
            } else {
                float v = load_as<float>((const void*)ptrs[s], e - starts[s], code);
                acc_f += v * v;
            }
        }
    }
    __shared__ float warp_f[32];
    __shared__ double warp_d[32];
    for (int o = 16; o > 0; o >>= 1) {
        acc_f += __shfl_down_sync(0xffffffffu, acc_f, o);
        acc_d += __shfl_down_sync(0xffffffffu, acc_d, o);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { warp_f[warp] = acc_f; warp_d[warp] = acc_d; }
    __syncthreads();
    if (threadIdx.x == 0) {
        float f = 0.0f;
        double d = 0.0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) { f += warp_f[w]; d += warp_d[w]; }
        partial_f[blockIdx.x] = f;
        partial_d[blockIdx.x] = d;
    }
}

// Per-block flag: 1 when the block saw an inf or a nan.
extern "C" __global__ void find_nonfinite(const i64* table, int n, i64 total, int* flags) {
    const i64 *starts = table, *ptrs = table + n, *codes = table + 3 * n;
    const i64 tile = (i64)blockDim.x * UNROLL;
    int bad = 0;
    for (i64 t0 = (i64)blockIdx.x * tile; t0 < total; t0 += (i64)gridDim.x * tile) {
        i64 t1 = min64(t0 + tile, total);
        int lo, hi;
        tile_slots(starts, n, t0, t1, &lo, &hi);
        for (int k = 0; k < UNROLL; ++k) {
            i64 e = t0 + (i64)k * blockDim.x + threadIdx.x;
            if (e >= t1) break;
            int s = find_slot(starts, lo, hi, e);
            bad |= !finite_at((const void*)ptrs[s], e - starts[s], (int)codes[s]);
        }
    }
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) flags[blockIdx.x] = bad;
}
"""
