// CPU kernels of dist8bit::quantize_blockwise and dist8bit::dequantize_blockwise.
//
// Contract: the operator schemas of dist8bit/backends/ops.py. Results are bit
// for bit those of dist8bit/backends/reference.py:
//   absmax  max |x| over the block, found as an unsigned max over the bits of
//           |x| (sign cleared): that order is the float order for every
//           non-negative float, and every NaN sorts above +inf, so a NaN in
//           the block makes absmax NaN (stored as the canonical 0x7FC00000,
//           as torch's amax does).
//   s       x * (1.0f / absmax) in float32, 0 where that is NaN.
//   code    #{ j : thresholds[j] < s } (common/code_search.h), then with a
//           seed the stochastic choice (common/stochastic_rounding.h).
//   out     code[c] * absmax in float32, rounded to out's dtype to nearest
//           even; a NaN becomes 0xFFFF in bfloat16, which is what torch's
//           vectorised float -> bfloat16 copy (the reference) writes.
//
// Work layout (at::parallel_for over torch's OpenMP pool). Blocks up to
// kFusedMaxBlock elements: each task takes a run of whole blocks and, a
// window of about kWindow elements at a time, computes the window's scales and
// then encodes it while it sits in L1, prefetching the next window. Larger
// blocks (functional.quantize passes blocksize = numel) are cut into pieces:
// one parallel pass for the pieces' maxima, one for encoding. Dequantize is
// element-parallel. Outputs of kStreamBytes and more are written with
// non-temporal stores (no read-for-ownership of lines nobody reads soon).
//
// With AVX-512 the count of thresholds below s comes from the encoder table
// (dist8bit/quant/encoder_table.py): per 16 lanes five 32-entry register
// permutes and one fma give the code, and a group of 64 with a lane near a
// jump is encoded again by an 8-step binary search whose lookups are register
// permutes too (no gathers: they are slow on AMD cores). Decoding looks up
// the 4 bytes of code[c] with byte permutes (VBMI). With AVX2 but no AVX-512,
// encoding takes the same lines on 8 lanes, and stochastic rounding picks
// between the bracketing codes with gathers (avx2_simd.h).
// Otherwise (and built with -DD8_PORTABLE) the same entry points run plain
// loops over the shared scalar rule of common/code_search.h. Blocks
// whose absmax is 0, Inf, NaN or so small that 1 / absmax overflows take the
// scalar helpers on every path. All paths give identical results.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "binding/kernel_contract.h"
#include "common/code_search.h"
#include "avx2_simd.h"
#include "common/stochastic_rounding.h"
#include "quant_simd.h"

namespace dist8bit {
namespace cpu {
namespace {

constexpr int64_t kFusedMaxBlock = 16384;  // blocks up to this size are quantized in one task each
constexpr int64_t kPiece = 16384;          // larger blocks are split into pieces of this size
constexpr int64_t kTaskElements = 32768;   // least work per parallel task
constexpr int64_t kStreamBytes = int64_t{8} << 20;  // outputs this large bypass the caches

// ---------------------------------------------------------------------------
// Quantize driver.

template <typename T>
struct Quantizer {
  const T* x;
  int64_t n;
  int64_t blocksize;
  uint8_t* codes;
  float* absmax;
  Codebook book;
  bool stochastic;
  uint32_t key;
  uint8_t zero_code;  // the code of s = 0 (blocks whose every s is 0)
  bool stream;        // write codes with non-temporal stores (large outputs)
#if D8_AVX512
  EncodeTables tables;
  CodeLookup code_table;
#endif

  Quantizer(const T* x_, int64_t n_, int64_t blocksize_, uint8_t* codes_, float* absmax_, const Codebook& book_,
            bool stochastic_, uint32_t key_)
      : x(x_),
        n(n_),
        blocksize(blocksize_),
        codes(codes_),
        absmax(absmax_),
        book(book_),
        stochastic(stochastic_),
        key(key_),
        zero_code(static_cast<uint8_t>(book_.nearest(0.0f))),
        stream(n_ >= kStreamBytes)
#if D8_AVX512
        ,
        tables(book_.thresholds, book_.encoder),
        code_table(book_.code)
#endif
  {
  }

  // Order this thread's non-temporal stores before the caller reads the codes.
  void fence() const {
#if D8_AVX512
    if (stream) _mm_sfence();
#endif
  }

  uint32_t range_absmax_bits(const T* p, int64_t len) const {
#if D8_AVX512
    return absmax_bits(p, len);
#else
    return absmax_bits_portable(p, len);
#endif
  }

  // Codes of elements [start, start + len) of one block with the given absmax.
  void encode(int64_t start, int64_t len, float block_absmax) const {
    const T* p = x + start;
    uint8_t* out = codes + start;
    const float inv = 1.0f / block_absmax;
    const bool regular = std::isfinite(block_absmax) && std::isfinite(inv);
    if (!regular && !stochastic && (block_absmax == 0.0f || !std::isfinite(block_absmax))) {
      // absmax 0 (all x are +-0), NaN or Inf: every s is +-0 or NaN, which is 0.
      std::memset(out, zero_code, static_cast<size_t>(len));
      return;
    }
#if D8_AVX512
    if (regular) {
      if (stochastic) {
        encode_stochastic_avx512(tables, code_table, p, len, inv, out, key, start);
      } else {
        encode_avx512(tables, p, len, &inv, kOneScale, out, stream);
      }
      return;
    }
#endif
#if D8_AVX2
    if (regular) {
      if (stochastic) {
        encode_stochastic_avx2(book, p, len, inv, out, key, start);
      } else {
        encode_avx2(book, p, len, inv, out);
      }
      return;
    }
#endif
    if (stochastic) {
      encode_stochastic_portable(book, p, len, inv, out, key, start);
    } else {
      encode_portable(book, p, len, inv, out);
    }
  }

  void run() const {
    const int64_t blocks = block_count(n, blocksize);
    if (blocksize <= kFusedMaxBlock) {
      // Blocks of 16 << shift elements are taken kWindow elements at a time:
      // all their scales, then one encode pass over the (L1-resident) window.
      int shift = -1;
#if D8_AVX512
      if (!stochastic && blocksize >= 16 && blocksize <= kWindow && (blocksize & (blocksize - 1)) == 0) {
        shift = 0;
        while ((int64_t{16} << shift) < blocksize) ++shift;
      }
#endif
      const int64_t per_window = shift >= 0 ? kWindow / blocksize : 1;
      const int64_t grain = std::max<int64_t>(per_window, kTaskElements / blocksize);
      at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
        float inv[kWindow / 16];
        for (int64_t b = first; b < last; b += per_window) {
          const int64_t window_end = std::min(last, b + per_window);
          bool all_regular = shift >= 0;
          for (int64_t q = b; q < window_end; ++q) {
            const int64_t start = q * blocksize;
            const float a = absmax_from_bits(range_absmax_bits(x + start, std::min(blocksize, n - start)));
            absmax[q] = a;
            inv[q - b] = 1.0f / a;
            all_regular = all_regular && std::isfinite(a) && std::isfinite(inv[q - b]);
          }
#if D8_AVX512
          if (all_regular) {
            const int64_t start = b * blocksize;
            encode_avx512(tables, x + start, std::min(n, window_end * blocksize) - start, inv, shift, codes + start,
                          stream);
            continue;
          }
#endif
          for (int64_t q = b; q < window_end; ++q) {
            const int64_t start = q * blocksize;
            encode(start, std::min(blocksize, n - start), absmax[q]);
          }
        }
        fence();
      });
      return;
    }
    // Large blocks: pieces of at most kPiece elements, never crossing a block.
    const int64_t per_block = (std::min(blocksize, n) + kPiece - 1) / kPiece;
    const int64_t pieces = blocks * per_block;
    auto piece_range = [&](int64_t q, int64_t* start, int64_t* len) {
      const int64_t b = q / per_block;
      const int64_t block_end = std::min(n, (b + 1) * blocksize);
      *start = b * blocksize + (q % per_block) * kPiece;
      *len = std::max<int64_t>(0, std::min(kPiece, block_end - *start));
    };
    std::vector<uint32_t> piece_max(static_cast<size_t>(pieces), 0u);
    at::parallel_for(0, pieces, 1, [&](int64_t first, int64_t last) {
      for (int64_t q = first; q < last; ++q) {
        int64_t start, len;
        piece_range(q, &start, &len);
        if (len > 0) piece_max[q] = range_absmax_bits(x + start, len);
      }
    });
    for (int64_t b = 0; b < blocks; ++b) {
      uint32_t bits = 0;
      for (int64_t q = b * per_block; q < (b + 1) * per_block; ++q) bits = std::max(bits, piece_max[q]);
      absmax[b] = absmax_from_bits(bits);
    }
    at::parallel_for(0, pieces, 1, [&](int64_t first, int64_t last) {
      for (int64_t q = first; q < last; ++q) {
        int64_t start, len;
        piece_range(q, &start, &len);
        if (len > 0) encode(start, len, absmax[q / per_block]);
      }
      fence();
    });
  }
};

// ---------------------------------------------------------------------------
// Dequantize.

#if D8_AVX512_VBMI
// 64 values to out[0..63] (whole 64-byte lines; kStream: non-temporal, out 64-byte aligned).
template <bool kStream>
__attribute__((always_inline)) inline void store64(float* out, const __m512* v) {
  for (int q = 0; q < 4; ++q) {
    if (kStream) {
      _mm512_stream_ps(out + 16 * q, v[q]);
    } else {
      _mm512_storeu_ps(out + 16 * q, v[q]);
    }
  }
}
template <bool kStream, typename T>
__attribute__((always_inline)) inline void store64(T* out, const __m512* v) {
  for (int h = 0; h < 2; ++h) {
    const __m512i line = _mm512_inserti64x4(_mm512_castsi256_si512(narrow(v[2 * h], out)), narrow(v[2 * h + 1], out), 1);
    if (kStream) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(out + 32 * h), line);
    } else {
      _mm512_storeu_si512(out + 32 * h, line);
    }
  }
}

// The first `count` of 64 values (count < 64).
__attribute__((always_inline)) inline void store_part(float* out, const __m512* v, int64_t count) {
  const __mmask64 mask = first_bits(count);
  for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(out + 16 * q, static_cast<__mmask16>(mask >> (16 * q)), v[q]);
}
template <typename T>
__attribute__((always_inline)) inline void store_part(T* out, const __m512* v, int64_t count) {
  const __mmask64 mask = first_bits(count);
  for (int q = 0; q < 4; ++q) {
    _mm256_mask_storeu_epi16(out + 16 * q, static_cast<__mmask16>(mask >> (16 * q)), narrow(v[q], out));
  }
}

template <bool kStream, typename T>
void decode_avx512_impl(const DecodeTables& tables, const uint8_t* codes, int64_t len, float scale, T* out) {
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 values[4];
  int64_t i = 0;
  for (; i + 64 <= len; i += 64) {
    tables.decode(_mm512_loadu_si512(codes + i), values);
    for (int q = 0; q < 4; ++q) values[q] = _mm512_mul_ps(values[q], vscale);
    store64<kStream>(out + i, values);
  }
  if (i < len) {
    tables.decode(_mm512_maskz_loadu_epi8(first_bits(len - i), codes + i), values);
    for (int q = 0; q < 4; ++q) values[q] = _mm512_mul_ps(values[q], vscale);
    store_part(out + i, values, len - i);
  }
}

template <typename T>
void decode_avx512(const DecodeTables& tables, const uint8_t* codes, int64_t len, float scale, T* out, bool stream) {
  if (stream && (reinterpret_cast<uintptr_t>(out) & 63) == 0) {
    decode_avx512_impl<true>(tables, codes, len, scale, out);
  } else {
    decode_avx512_impl<false>(tables, codes, len, scale, out);
  }
}
#endif  // D8_AVX512_VBMI

template <typename T>
void dequantize_impl(const uint8_t* codes, int64_t n, const float* code, const float* absmax, int64_t blocksize,
                     T* out) {
#if D8_AVX512_VBMI
  const DecodeTables tables(code);
  const bool stream = n * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
#endif
  constexpr int64_t kUnit = 64;
  const int64_t units = (n + kUnit - 1) / kUnit;
  at::parallel_for(0, units, kTaskElements / kUnit, [&](int64_t first, int64_t last) {
    int64_t e = first * kUnit;
    const int64_t end = std::min(n, last * kUnit);
    while (e < end) {
      const int64_t b = e / blocksize;
      const int64_t stop = std::min(end, (b + 1) * blocksize);
#if D8_AVX512_VBMI
      decode_avx512(tables, codes + e, stop - e, absmax[b], out + e, stream);
#else
      decode_portable(codes + e, stop - e, code, absmax[b], out + e);
#endif
      e = stop;
    }
#if D8_AVX512_VBMI
    if (stream) _mm_sfence();
#endif
  });
}

// ---------------------------------------------------------------------------
// Operators.

// The CPU backend of binding::quantize_op and binding::dequantize_op.
struct QuantizeCpu {
  static constexpr binding::BackendInfo kInfo = {"dist8bit CPU kernel", at::kCPU, /*mixed_grads=*/true};

  static void quantize(const binding::QuantizeCall& call, const at::Tensor& x, const at::Tensor& codes,
                       const at::Tensor& absmax, int64_t blocksize, std::optional<int64_t> seed) {
    const int64_t bs = effective_blocksize(call.n, blocksize);
    const bool stochastic = seed.has_value();
    const uint32_t key = stochastic ? seed_key(static_cast<uint64_t>(*seed)) : 0u;
    auto* out = codes.mutable_data_ptr<uint8_t>();
    auto* scales = absmax.mutable_data_ptr<float>();
    binding::visit_torch_float(call.x_type, [&](auto tag) {
      using T = typename decltype(tag)::type;
      Quantizer<T>(static_cast<const T*>(x.const_data_ptr()), call.n, bs, out, scales, call.book, stochastic, key)
          .run();
    });
  }

  static void dequantize(const binding::DequantizeCall& call, const at::Tensor& codes, const at::Tensor& code,
                         const at::Tensor& absmax, int64_t blocksize, const at::Tensor& out) {
    const int64_t bs = effective_blocksize(call.n, blocksize);
    const auto* in = codes.const_data_ptr<uint8_t>();
    const float* table = code.const_data_ptr<float>();
    const float* scales = absmax.const_data_ptr<float>();
    binding::visit_torch_float(call.out_type, [&](auto tag) {
      using T = typename decltype(tag)::type;
      dequantize_impl(in, call.n, table, scales, bs, static_cast<T*>(out.mutable_data_ptr()));
    });
  }
};

}  // namespace
}  // namespace cpu
}  // namespace dist8bit

TORCH_LIBRARY_IMPL(dist8bit, CPU, m) { dist8bit::binding::register_quantize_ops<dist8bit::cpu::QuantizeCpu>(m); }
