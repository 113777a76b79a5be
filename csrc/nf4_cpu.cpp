// NF4 quantize / dequantize on the CPU with OpenMP: the fast path for quantizing large checkpoints.
//
// A plain C ABI (loaded by kernels/_native.py with ctypes), so the library does not depend on the
// torch build it meets at run time. Byte-identical to kernels/reference/nf4.py, which is
// bit-compatible with bitsandbytes 0.50.2; every fp32 operation below happens in the same order as
// there, and the build turns off FMA contraction (-ffp-contract=off) because a fused multiply-add
// rounds once where the reference rounds twice.
//
// The mean of the absmax vector for double quantization is left to torch (kernels/_native.py): its
// summation order fixes the offset's last bit, and the reference takes it from torch.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// The 16 NF4 values (kernels/nf4_format.py NF4_CODE); the decimal strings are exact fp32 values.
constexpr float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};
constexpr uint8_t kZeroCode = 7;  // kNF4[7] == 0: the pad nibble of an odd element count

enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline float bf16_to_float(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t float_to_bf16(float f) {
    // round to nearest even, as torch's .to(torch.bfloat16); NaN stays a quiet NaN. Branch-free so
    // that the conversion loop vectorizes.
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    const uint32_t rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
    const uint32_t quiet_nan = (bits >> 16) | 0x40;
    return static_cast<uint16_t>(f != f ? quiet_nan : rounded);
}

// Index of the nearest NF4 value: the number of midpoints strictly below v, so a value exactly on a
// midpoint takes the lower code (torch.bucketize with right=False). 15 compares vectorize well.
inline uint8_t nf4_code(float v, const float* mid) {
    int code = 0;
    for (int j = 0; j < 15; ++j) code += v > mid[j];
    return static_cast<uint8_t>(code);
}

}  // namespace

extern "C" {

int32_t m2pt_nf4_num_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

}  // extern "C"

namespace {

template <int32_t DT>
inline float load_t(const void* src, int64_t i) {
    if constexpr (DT == kF16) return static_cast<float>(static_cast<const _Float16*>(src)[i]);
    else if constexpr (DT == kBF16) return bf16_to_float(static_cast<const uint16_t*>(src)[i]);
    else return static_cast<const float*>(src)[i];
}

constexpr int64_t kMaxBlock = 4096;

// One loop per step over a block staged in fp32, so that each loop vectorizes.
template <int32_t DT>
void quantize_impl(const void* src, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
    float mid[15];
    for (int j = 0; j < 15; ++j) mid[j] = (kNF4[j] + kNF4[j + 1]) / 2.0f;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const int64_t full = n - n % blocksize;

#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
        alignas(64) float v[kMaxBlock];
        alignas(64) uint8_t code[kMaxBlock + 1];
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        float am = 0.0f;
        for (int64_t i = 0; i < len; ++i) {
            v[i] = load_t<DT>(src, start + i);
            am = std::max(am, std::fabs(v[i]));
        }
        const float safe = std::max(am, 1e-38f);  // all-zero blocks
        // bitsandbytes multiplies full blocks by a reciprocal but divides the short last block, and
        // stores the clamped absmax only for that last block
        if (start < full) {
            absmax[b] = am;
            const float inv = 1.0f / safe;
            for (int64_t i = 0; i < len; ++i) v[i] = v[i] * inv;
        } else {
            absmax[b] = safe;
            for (int64_t i = 0; i < len; ++i) v[i] = v[i] / safe;
        }
        for (int64_t i = 0; i < len; ++i) code[i] = nf4_code(std::min(std::max(v[i], -1.0f), 1.0f), mid);
        code[len] = kZeroCode;  // read only when len is odd (the last element of an odd count)
        uint8_t* dst = packed + (start >> 1);
        for (int64_t i = 0; i < (len + 1) / 2; ++i) dst[i] = static_cast<uint8_t>((code[2 * i] << 4) | code[2 * i + 1]);
    }
}

template <int32_t DT>
void dequantize_impl(const uint8_t* packed, const float* scales, int64_t n, int64_t blocksize, void* out) {
    const int64_t nblocks = (n + blocksize - 1) / blocksize;

#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
        alignas(64) float v[kMaxBlock + 1];
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        const float s = scales[b];
        const uint8_t* src = packed + (start >> 1);
        for (int64_t i = 0; i < (len + 1) / 2; ++i) {
            v[2 * i] = kNF4[src[i] >> 4] * s;
            v[2 * i + 1] = kNF4[src[i] & 0xF] * s;
        }
        for (int64_t i = 0; i < len; ++i) {
            if constexpr (DT == kF16) static_cast<_Float16*>(out)[start + i] = static_cast<_Float16>(v[i]);
            else if constexpr (DT == kBF16) static_cast<uint16_t*>(out)[start + i] = float_to_bf16(v[i]);
            else static_cast<float*>(out)[start + i] = v[i];
        }
    }
}

}  // namespace

extern "C" {

// src: n elements (fp32/fp16/bf16 per dtype), flattened weight. packed: (n + 1) / 2 bytes.
// absmax: ceil(n / blocksize) floats. blocksize must be even and at most 4096 (all NF4 blocksizes
// are), so no byte straddles two blocks.
int32_t m2pt_nf4_quantize(const void* src, int32_t dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                          float* absmax) {
    if (n <= 0 || blocksize <= 0 || blocksize > kMaxBlock || (blocksize & 1)) return 1;
    switch (dtype) {
        case kF32: quantize_impl<kF32>(src, n, blocksize, packed, absmax); return 0;
        case kF16: quantize_impl<kF16>(src, n, blocksize, packed, absmax); return 0;
        case kBF16: quantize_impl<kBF16>(src, n, blocksize, packed, absmax); return 0;
        default: return 1;
    }
}

// scales: fp32 per block (double quantization already undone by the caller). out: n elements of
// dtype, each NF4 value * scale in fp32, rounded once.
int32_t m2pt_nf4_dequantize(const uint8_t* packed, const float* scales, int64_t n, int64_t blocksize, void* out,
                            int32_t dtype) {
    if (n <= 0 || blocksize <= 0 || blocksize > kMaxBlock || (blocksize & 1)) return 1;
    switch (dtype) {
        case kF32: dequantize_impl<kF32>(packed, scales, n, blocksize, out); return 0;
        case kF16: dequantize_impl<kF16>(packed, scales, n, blocksize, out); return 0;
        case kBF16: dequantize_impl<kBF16>(packed, scales, n, blocksize, out); return 0;
        default: return 1;
    }
}

// bitsandbytes' CPU 8-bit blockwise quantizer (double quantization of the absmax vector): the
// normalized value is snapped to one of 65536 evenly spaced points and looked up in `lut`, built by
// kernels/reference/nf4.py dynamic_lut() from the dynamic code's midpoints.
int32_t m2pt_blockwise8_quantize(const float* x, int64_t n, int64_t blocksize, const uint8_t* lut, uint8_t* out,
                                 float* absmax) {
    if (n <= 0 || blocksize <= 0) return 1;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;

#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t start = b * blocksize;
        const int64_t end = std::min(start + blocksize, n);
        float am = 0.0f;
        for (int64_t i = start; i < end; ++i) am = std::max(am, std::fabs(x[i]));
        absmax[b] = am;
        if (am == 0.0f) {
            std::memset(out + start, 0, static_cast<size_t>(end - start));
            continue;
        }
        const float inv = 1.0f / am;
        for (int64_t i = start; i < end; ++i) {
            const float v = std::min(std::max(x[i] * inv, -1.0f), 1.0f);
            const float t = ((v + 1.0f) * 0.5f) * 65535.0f + 0.5f;
            int64_t idx = static_cast<int64_t>(t);
            idx = std::min<int64_t>(std::max<int64_t>(idx, 0), 65535);
            out[i] = lut[idx];
        }
    }
    return 0;
}

}  // extern "C"
