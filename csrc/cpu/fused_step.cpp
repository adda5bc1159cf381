// CPU kernel of dist8bit::fused_step: one optimizer step over many segments.
//
// Contract: the fused_step schema of dist8bit/backends/ops.py. Results are bit
// for bit those of dist8bit/backends/reference_optim.py (parameters, 8- and
// 4-bit codes and absmax, float32 states, the non-finite count; norm_out up to
// the order of its float64 sum):
//   g       float(grad) * grad_scale[k]; a non-finite g counts as 0 in the
//           update and its element keeps its parameter and old state values
//   states  8- and 4-bit: code[c] * absmax[block] on the way in; on the way
//           out the block's new absmax (unsigned max over |x| bits,
//           NaN-propagating) and the codebook's rounding rule, exactly as
//           quantize.cpp encodes (4-bit: nibble_simd.h, codes packed two per
//           byte, an odd segment's last high nibble 0)
//   d       dist8bit::update_value of common/update_rules.h, the rules every
//           backend shares, here on 16-lane vectors (Vec16 below); sqrt and
//           division are IEEE (vsqrtps, vdivps), as sqrtf and / in the header.
//           (torch.sqrt on the CPU goes through MKL's vsSqrt, which is not
//           correctly rounded on every CPU; tests/test_cpu_fused_step.py says
//           how the comparison deals with that.)
//   p       apply_direction(p, hyper[DECAY], write_rate(rule, lr_eff), d), lr_eff = hyper[LR]
//           * update_scale[k] in float32, stored in the parameter dtype
//           rounding to nearest even (a NaN becomes 0xFFFF in bfloat16 and
//           keeps its payload in float16, as torch's vectorised copy does) or,
//           for bfloat16 with a seed, stochastically (reference_optim.
//           round_bf16_stochastically, element index segment_offsets[k] + i)
//   errors  compensated bfloat16 parameters (errors[k] int8 or int16, one
//           code q per element; never with a seed): p is read as
//           compensated_value(bf16 bits, q) of common/weight_error.h (norm
//           passes too), written rounding to nearest even, and q rewritten as
//           weight_error(stepped, written bits) in the same pass; a skipped
//           element's stepped is that restored p, so it keeps p and q.
//           weight_error_simd.h has the 16-lane integer form; the buffer width
//           is a run-time choice per call (no extra instantiations)
//
// Work layout. The call's segments are cut into units: the quantized blocks
// (blocks of `blocksize` start at each segment's first element) or, for
// 32-bit states, runs of kChunk32 elements. A prefix sum over the segments'
// unit counts numbers all units of the call; one task per thread
// (at::parallel_for) takes chunks of consecutive units from a shared counter
// until none are left. A unit is processed 64 elements at a time: load g and
// p, decode the states (8-bit: VBMI byte-plane lookups; 4-bit: one permute of
// the block's scaled 16-entry table), run the rule on four 16-lane vectors,
// store p, keep the new quantized states in a local buffer (at most 4096
// floats per slot, in L1) while taking their absmax, and at the end of the
// unit encode the buffer as quantize.cpp does (quant_simd.h: the encoder
// table's lines, the permute-based binary search near jumps; nibble_simd.h: a
// 4-step search in registers). The inner loops are templated on the rule, the
// weight-decay mode, the state count, whether states are quantized and the
// parameter and gradient dtypes (norm passes look the gradient dtype up at run
// time), so the rule's switch folds away at compile time; 8 or 4 bits is a
// run-time choice per group of 64 (one predictable branch, no extra
// instantiations). Norm mode (norm_out
// given) runs the same loop, writes nothing but one float64 partial sum per
// unit and adds the partials per segment in unit order, so its result does not
// depend on the thread count or the chunking.
//
// Without AVX-512 but with AVX2 (AMD EPYC Zen 2/3, older Intel) the units run
// 8 lanes at a time (unit_avx2; avx2_simd.h and nibble_simd.h encode), norm
// passes too, and a unit's last len % 8 elements one by one (step_element).
// Otherwise, and with -DD8_PORTABLE, the same units run step_element over
// every element (update_element and quant_simd.h's portable helpers). All
// paths give identical results (norms: to float64 summation order).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "binding/kernel_contract.h"
#include "common/code_search.h"
#include "common/op_contract.h"
#include "common/stochastic_rounding.h"
#include "common/update_rules.h"
#include "avx2_simd.h"
#include "nibble_simd.h"
#include "quant_simd.h"
#include "weight_error_simd.h"

namespace dist8bit {
namespace cpu {
namespace {

constexpr int64_t kMaxBlock = kMaxStateBlocksize;
constexpr int64_t kChunk32 = 2048;        // 32-bit states: elements per unit
constexpr int64_t kMinChunkElements = 16384;  // work taken at a time by a thread: at least this much,
constexpr int64_t kMaxChunkElements = 65536;  // at most this much,
constexpr int64_t kChunksPerThread = 8;       // and, between those, this many chunks per thread
constexpr int64_t kGroup = 64;            // elements per inner iteration (one line of codes)
constexpr int64_t kPrefetchAhead = 512;   // software prefetch distance, elements

// One segment, ready for the kernels: used state slots in rule order.
struct Segment {
  void* param;
  const void* grad;
  FloatType grad_kind;
  void* state[kMaxStates];    // uint8 codes (8- or 4-bit) or float32 values
  float* absmax[kMaxStates];  // quantized: one scale per block
  void* errors;               // compensated bfloat16: the error buffer (int8 or int16), else nullptr
  int64_t numel;
  int64_t first_index;  // segment_offsets[k]: stochastic rounding index of element 0
  float grad_scale;     // 1 when the call has none (never applied then)
  float lr;             // hyper[LR] * update_scale[k]
  int64_t first_unit;
  int64_t units;
};

// The codebook of one used quantized slot (8-bit: encode and decode tables; 4-bit: nibble).
struct SlotCode {
  Codebook book;
  uint8_t zero_code;  // the code of s = 0 (blocks whose absmax is 0, Inf or NaN)
#if D8_AVX512
  const EncodeTables* encode;
  const NibbleTables* nibble;
#endif
#if D8_AVX512_VBMI
  const DecodeTables* decode;
#endif
#if D8_AVX2
  const NibbleTables8* nibble8;  // 4-bit: the search's step tables on 8 lanes
#endif
};

struct Call {
  StepConstants c;
  float decay;
  int64_t unit;  // elements per unit
  bool four_bit;  // quantized states hold 4-bit codes, two per byte (else 8-bit)
  bool has_grad_scale;
  bool stochastic;  // bfloat16 parameters with stochastic rounding
  uint32_t key;
  ErrorLayout errors;  // compensated bfloat16 parameters: the error buffers' width (bits 0: none)
  const Segment* segments;
  SlotCode slot[kMaxStates];
  double* unit_norms;  // norm mode: one partial sum per unit
};

// The codes of `len` kept state values with the block's new absmax: quantize.cpp's
// round-to-nearest path (Quantizer::encode), on a buffer already in L1.
// 8-bit: one code per byte; 4-bit: code_bytes(len, 4) packed bytes.
void encode_state(const SlotCode& slot, bool four_bit, const float* x, int64_t len, float absmax, uint8_t* out) {
  const float inv = 1.0f / absmax;
  const bool scale_finite = std::isfinite(absmax) && std::isfinite(inv);
  if (!scale_finite && (absmax == 0.0f || !std::isfinite(absmax))) {
    // Every s is +-0 or NaN, which rounds as 0.
    if (four_bit) {
      fill_nibbles(slot.zero_code, len, out);
    } else {
      std::memset(out, slot.zero_code, static_cast<size_t>(len));
    }
    return;
  }
  // Otherwise 1 / absmax may overflow: the scalar loops handle that s.
  if (four_bit) {
#if D8_AVX512
    if (scale_finite) return encode_nibbles_avx512(*slot.nibble, x, len, inv, out);
#elif D8_AVX2
    if (scale_finite) return encode_nibbles_avx2(slot.book, *slot.nibble8, x, len, inv, out);
#endif
    return encode_nibbles_portable(slot.book, x, len, inv, out);
  }
#if D8_AVX512
  if (scale_finite) return encode_avx512_impl<false, false>(*slot.encode, x, len, &inv, kOneScale, out);
#elif D8_AVX2
  if (scale_finite) return encode_avx2(slot.book, x, len, inv, out);
#endif
  encode_portable(slot.book, x, len, inv, out);
}

// The quantized slot's codes of element `start` of a segment (start is even for 4-bit: a block's first).
inline uint8_t* codes_at(void* state, bool four_bit, int64_t start) {
  return static_cast<uint8_t*>(state) + (four_bit ? start / 2 : start);
}

// The bfloat16 bits of a float under stochastic rounding (scalar).
inline uint16_t bfloat16_bits_stochastic(float value, uint32_t key, int64_t index) {
  const uint32_t bits = float_to_bits(value);
  if ((bits & kAbsMask) > kInfBits) return 0xFFFFu;  // NaN, as torch's vectorised copy writes it
  if ((bits & kAbsMask) == kInfBits) return static_cast<uint16_t>(bits >> 16);
  const uint32_t random = random_bits_for_index(key, static_cast<uint64_t>(index)) & 0xFFFFu;
  return static_cast<uint16_t>((bits + random) >> 16);
}

// The operators of a SIMD value type (Vec16, Vec8 below): `op` as one lane-wise
// `intrinsic`, with a float operand on either side broadcast by `set1`.
#define D8_VEC_OPERATOR(Vec, set1, op, intrinsic)                                                             \
  __attribute__((always_inline)) inline Vec operator op(Vec a, Vec b) { return Vec(intrinsic(a.v, b.v)); }   \
  __attribute__((always_inline)) inline Vec operator op(float a, Vec b) { return Vec(intrinsic(set1(a), b.v)); } \
  __attribute__((always_inline)) inline Vec operator op(Vec a, float b) { return Vec(intrinsic(a.v, set1(b))); }

// ---------------------------------------------------------------------------
// Scalar units (portable path).

inline float load_value(const void* base, FloatType kind, int64_t i) {
  return binding::visit_torch_float(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return to_float(static_cast<const T*>(base)[i]);
  });
}

inline void store_param_scalar(float* out, float v, const Call&, int64_t) { *out = v; }
inline void store_param_scalar(c10::Half* out, float v, const Call&, int64_t) { store_float(out, v); }
inline void store_param_scalar(c10::BFloat16* out, float v, const Call& call, int64_t index) {
  if (call.stochastic) {
    *out = c10::BFloat16(bfloat16_bits_stochastic(v, call.key, index), c10::BFloat16::from_bits());
  } else {
    store_float(out, v);
  }
}

// The float32 that element `at` of the segment stands for: the parameter or,
// compensated, the bfloat16 with its error code added (common/weight_error.h).
template <typename P>
inline float read_param_scalar(const Call& call, const Segment& seg, const P* param, int64_t at) {
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    if (call.errors.enabled()) {
      return compensated_value(param->x, load_error(call.errors, seg.errors, at), call.errors.format);
    }
  }
  return to_float(*param);
}

// Stores `v` as element `at`'s parameter and, compensated, the error code of that write.
template <typename P>
inline void write_param_scalar(const Call& call, const Segment& seg, P* param, int64_t at, float v) {
  store_param_scalar(param, v, call, seg.first_index + at);
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    if (call.errors.enabled()) {
      store_error(call.errors, seg.errors, at, weight_error(v, param->x, call.errors.format));
    }
  }
}

// One element of a unit: element i of the unit whose first element is `start`,
// with the unit's block scales `scale` (quantized slots). The loop body of
// unit_scalar, and the AVX2 units' tail. kNorm: adds d * d to *norm (finite
// gradients only) and writes nothing; else the parameter is written, and the
// new states go to kept[k][i] (quantized) or to the 32-bit state.
template <Rule R, WeightDecayMode W, int NS, bool kQuant, bool kNorm, typename P>
inline void step_element(const Call& call, const Segment& seg, int64_t start, int64_t i, const float* scale,
                         float (*kept)[kMaxBlock], double* norm, int64_t* bad) {
  constexpr int kSlots = NS > 0 ? NS : 1;
  const int64_t at = start + i;  // index in the segment
  P* param = static_cast<P*>(seg.param) + at;
  float g = load_value(seg.grad, seg.grad_kind, at);
  if (call.has_grad_scale) g = g * seg.grad_scale;
  const bool finite = std::isfinite(g);
  const float p = read_param_scalar(call, seg, param, at);
  float old[kSlots], state[kSlots];
  for (int k = 0; k < NS; ++k) {
    if (kQuant) {
      const uint8_t* codes = static_cast<const uint8_t*>(seg.state[k]);
      const int c = call.four_bit ? nibble_at(codes, at) : codes[at];
      old[k] = call.slot[k].book.code[c] * scale[k];
    } else {
      old[k] = static_cast<const float*>(seg.state[k])[at];
    }
    state[k] = old[k];
  }
  const float d = update_element(R, W, call.c, finite ? g : 0.0f, p, state, NS, seg.lr);
  if (kNorm) {
    if (finite) *norm += static_cast<double>(d) * static_cast<double>(d);
    return;
  }
  *bad += finite ? 0 : 1;
  write_param_scalar(call, seg, param, at, finite ? apply_direction(p, call.decay, write_rate(R, seg.lr), d) : p);
  for (int k = 0; k < NS; ++k) {
    const float value = finite ? state[k] : old[k];
    if (kQuant) {
      kept[k][i] = value;
    } else {
      static_cast<float*>(seg.state[k])[at] = value;
    }
  }
}

template <Rule R, WeightDecayMode W, int NS, bool kQuant, bool kNorm, typename P>
void unit_scalar(const Call& call, const Segment& seg, int64_t u, float (*kept)[kMaxBlock], int64_t* nonfinite) {
  constexpr int kSlots = NS > 0 ? NS : 1;
  const int64_t b = u - seg.first_unit;
  const int64_t start = b * call.unit;
  const int64_t len = std::min(call.unit, seg.numel - start);
  float scale[kSlots] = {};
  if (kQuant) {
    for (int k = 0; k < NS; ++k) scale[k] = seg.absmax[k][b];
  }
  double norm = 0.0;
  int64_t bad = 0;
  for (int64_t i = 0; i < len; ++i) step_element<R, W, NS, kQuant, kNorm, P>(call, seg, start, i, scale, kept, &norm, &bad);
  if (kNorm) {
    call.unit_norms[u] = norm;
    return;
  }
  *nonfinite += bad;
  if (kQuant) {
    for (int k = 0; k < NS; ++k) {
      const float absmax = absmax_from_bits(absmax_bits_portable(kept[k], len));
      seg.absmax[k][b] = absmax;
      encode_state(call.slot[k], call.four_bit, kept[k], len, absmax, codes_at(seg.state[k], call.four_bit, start));
    }
  }
}

// The gradient dtype of the SIMD units as a template argument: float,
// c10::Half, c10::BFloat16, or AnyFloat for "the segment's grad_kind, looked up
// per vector" (the norm passes use that: they run once per step at most, and
// it saves compile time).
struct AnyFloat {};

template <typename G>
constexpr int64_t grad_bytes(FloatType) {
  return sizeof(G);
}
template <>
constexpr int64_t grad_bytes<AnyFloat>(FloatType kind) {
  return kind == FloatType::kFloat32 ? 4 : 2;
}

#if D8_AVX512
// ---------------------------------------------------------------------------
// AVX-512 units.

// 16 float32 lanes with lane-wise IEEE operations: the value type the rules of
// common/update_rules.h run on here (each operator is one correctly rounded
// float32 operation per lane, as in the scalar code; no contraction).
struct Vec16 {
  __m512 v;
  Vec16() = default;
  explicit Vec16(float x) : v(_mm512_set1_ps(x)) {}
  explicit Vec16(__m512 x) : v(x) {}
};

D8_VEC_OPERATOR(Vec16, _mm512_set1_ps, +, _mm512_add_ps)
D8_VEC_OPERATOR(Vec16, _mm512_set1_ps, -, _mm512_sub_ps)
D8_VEC_OPERATOR(Vec16, _mm512_set1_ps, *, _mm512_mul_ps)
D8_VEC_OPERATOR(Vec16, _mm512_set1_ps, /, _mm512_div_ps)

__attribute__((always_inline)) inline Vec16 sqrt_value(Vec16 x) { return Vec16(_mm512_sqrt_ps(x.v)); }

// (x > 0) - (x < 0) as float: 1, -1, or +0 (for +-0 and NaN).
__attribute__((always_inline)) inline Vec16 sign_value(Vec16 x) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 sign = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, zero, _CMP_GT_OQ), _mm512_set1_ps(1.0f));
  sign = _mm512_mask_mov_ps(sign, _mm512_cmp_ps_mask(x.v, zero, _CMP_LT_OQ), _mm512_set1_ps(-1.0f));
  return Vec16(sign);
}

__attribute__((always_inline)) inline void store_param(float* out, __m512 v, __mmask16 mask, const Call&, int64_t) {
  _mm512_mask_storeu_ps(out, mask, v);
}
__attribute__((always_inline)) inline void store_param(c10::Half* out, __m512 v, __mmask16 mask, const Call&, int64_t) {
  _mm256_mask_storeu_epi16(out, mask, narrow(v, out));
}
__attribute__((always_inline)) inline void store_param(c10::BFloat16* out, __m512 v, __mmask16 mask, const Call& call,
                                                       int64_t index0) {
  if (!call.stochastic) {
    _mm256_mask_storeu_epi16(out, mask, narrow(v, out));
    return;
  }
  // (bits + 16 random bits) >> 16; +-Inf stays itself (its low bits are 0), NaN becomes 0xFFFF.
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i random = _mm512_and_si512(random_bits16(call.key, index0), _mm512_set1_epi32(0xFFFF));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, random), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
  _mm256_mask_storeu_epi16(out, mask, _mm512_cvtepi32_epi16(rounded));
}

// The old values of 64 elements of an 8-bit slot: code[c] * scale (lanes past `valid` read code 0).
__attribute__((always_inline)) inline void decode_group(const SlotCode& slot, const uint8_t* codes, __mmask64 valid,
                                                        float scale, __m512 out[4]) {
#if D8_AVX512_VBMI
  slot.decode->decode(_mm512_maskz_loadu_epi8(valid, codes), out);
#else
  // Without VBMI (Intel Skylake-SP, Cascade Lake): gathers, which those cores run at about 5 cycles per 16.
  const __m512i bytes = _mm512_maskz_loadu_epi8(valid, codes);
  for (int q = 0; q < 4; ++q) {
    const __m512i index = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(bytes, q));
    out[q] = _mm512_i32gather_ps(index, slot.book.code, 4);
  }
#endif
  const __m512 s = _mm512_set1_ps(scale);
  for (int q = 0; q < 4; ++q) out[q] = _mm512_mul_ps(out[q], s);
}

__attribute__((always_inline)) inline void prefetch_range(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(c + line, _MM_HINT_T0);
}

// The gradient of element i (G: a dtype, or AnyFloat).
template <typename G>
__attribute__((always_inline)) inline __m512 load_grad(const void* base, FloatType, int64_t i) {
  return load16(static_cast<const G*>(base) + i);
}
template <typename G>
__attribute__((always_inline)) inline __m512 load_grad(const void* base, FloatType, int64_t i, __mmask16 lanes) {
  return load16(static_cast<const G*>(base) + i, lanes);
}
template <>
__attribute__((always_inline)) inline __m512 load_grad<AnyFloat>(const void* base, FloatType kind, int64_t i,
                                                                 __mmask16 lanes) {
  return binding::visit_torch_float(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return load16(static_cast<const T*>(base) + i, lanes);
  });
}
template <>
__attribute__((always_inline)) inline __m512 load_grad<AnyFloat>(const void* base, FloatType kind, int64_t i) {
  return load_grad<AnyFloat>(base, kind, i, static_cast<__mmask16>(0xFFFF));
}

// One unit: its elements 64 at a time (group<true>; a last partial group masks
// its lanes), then the 8-bit slots' absmax and codes. G: the gradient dtype.
template <Rule R, WeightDecayMode W, int NS, bool kQuant, bool kNorm, typename P, typename G>
class UnitAvx512 {
 public:
  UnitAvx512(const Call& call, const Segment& seg, int64_t u, float (*kept)[kMaxBlock])
      : call_(call),
        seg_(seg),
        u_(u),
        block_(u - seg.first_unit),
        start_(block_ * call.unit),
        len_(std::min(call.unit, seg.numel - start_)),
        param_(static_cast<P*>(seg.param) + start_),
        grad_(static_cast<const char*>(seg.grad) + start_ * grad_bytes<G>(seg.grad_kind)),
        kept_(kept),
        grad_scale_(_mm512_set1_ps(seg.grad_scale)),
        errors_(kBf16 && call.errors.enabled() ? static_cast<char*>(seg.errors) + start_ * call.errors.bytes()
                                               : nullptr),
        error_format_(call.errors) {
    for (int k = 0; k < NS; ++k) {
      scale_[k] = kQuant ? seg.absmax[k][block_] : 0.0f;
      absmax_[k] = _mm512_setzero_si512();
      // 4-bit: code[c] * scale for the 16 codes, the same float32 products as per element.
      if (kQuant && call.four_bit) {
        scaled_code_[k] = _mm512_mul_ps(call.slot[k].nibble->code, _mm512_set1_ps(scale_[k]));
      }
    }
  }

  void run(int64_t* nonfinite) {
    int64_t i = 0;
    for (; i + kGroup <= len_; i += kGroup) group<true>(i, kGroup);
    if (i < len_) group<false>(i, len_ - i);
    if (kNorm) {
      call_.unit_norms[u_] = _mm512_reduce_add_pd(norm_);
      return;
    }
    *nonfinite += bad_;
    if (kQuant) {
      for (int k = 0; k < NS; ++k) {
        const float block_absmax = absmax_from_bits(_mm512_reduce_max_epu32(absmax_[k]));
        seg_.absmax[k][block_] = block_absmax;
        encode_state(call_.slot[k], call_.four_bit, kept_[k], len_, block_absmax,
                     codes_at(seg_.state[k], call_.four_bit, start_));
      }
    }
  }

 private:
  static constexpr int kSlots = NS > 0 ? NS : 1;
  static constexpr bool kBf16 = std::is_same_v<P, c10::BFloat16>;

  // Elements i .. i + count - 1 of the unit (count = 64 when kFull).
  template <bool kFull>
  __attribute__((always_inline)) void group(int64_t i, int64_t count) {
    const int64_t at = start_ + i;  // index in the segment
    if (at + kPrefetchAhead < seg_.numel) {
      // The loop is compute-heavy enough that the hardware prefetcher lags.
      const int64_t bytes = grad_bytes<G>(seg_.grad_kind);
      prefetch_range(grad_ + (i + kPrefetchAhead) * bytes, kGroup * bytes);
      prefetch_range(param_ + i + kPrefetchAhead, kGroup * static_cast<int64_t>(sizeof(P)));
      if (errors_ != nullptr) {
        prefetch_range(errors_ + (i + kPrefetchAhead) * call_.errors.bytes(), kGroup * call_.errors.bytes());
      }
      for (int k = 0; k < NS; ++k) {
        if (kQuant) {
          prefetch_range(codes_at(seg_.state[k], call_.four_bit, at + kPrefetchAhead),
                         call_.four_bit ? kGroup / 2 : kGroup);
        } else {
          prefetch_range(static_cast<const float*>(seg_.state[k]) + at + kPrefetchAhead, kGroup * 4);
        }
      }
    }
    const __mmask64 valid = kFull ? ~__mmask64(0) : first_bits(count);
    __m512 old[kSlots][4];
    for (int k = 0; k < NS; ++k) {
      if (kQuant && call_.four_bit) {
        decode_nibble_group<kFull>(codes_at(seg_.state[k], true, at), count, scaled_code_[k], old[k]);
      } else if (kQuant) {
        decode_group(call_.slot[k], static_cast<const uint8_t*>(seg_.state[k]) + at, valid, scale_[k], old[k]);
      } else {
        const float* state = static_cast<const float*>(seg_.state[k]) + at;
        for (int q = 0; q < 4; ++q) {
          old[k][q] = kFull ? _mm512_loadu_ps(state + 16 * q)
                            : _mm512_maskz_loadu_ps(static_cast<__mmask16>(valid >> (16 * q)), state + 16 * q);
        }
      }
    }
    for (int q = 0; q < 4; ++q) {
      if (!kFull && 16 * q >= count) break;
      vector<kFull>(i + 16 * q, static_cast<__mmask16>(valid >> (16 * q)), old, q);
    }
  }

  // The 16 elements e .. e + 15 of the unit (lanes: the valid ones).
  template <bool kFull>
  __attribute__((always_inline)) void vector(int64_t e, __mmask16 lanes, const __m512 (*old)[4], int q) {
    __m512 g = kFull ? load_grad<G>(grad_, seg_.grad_kind, e) : load_grad<G>(grad_, seg_.grad_kind, e, lanes);
    if (call_.has_grad_scale) g = _mm512_mul_ps(g, grad_scale_);
    const __mmask16 not_finite = _mm512_fpclass_ps_mask(g, 0x99);  // QNaN | +Inf | -Inf | SNaN
    const __m512 p = read_param<kFull>(e, lanes);
    if (kNorm) {
      const Vec16 d = direction(_mm512_maskz_mov_ps(static_cast<__mmask16>(~not_finite), g), p, old, q, nullptr);
      const __mmask16 finite = static_cast<__mmask16>(lanes & ~not_finite);
      const __m512d low = _mm512_cvtps_pd(_mm512_castps512_ps256(d.v));
      const __m512d high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d.v), 1)));
      norm_ = _mm512_mask_add_pd(norm_, static_cast<__mmask8>(finite), norm_, _mm512_mul_pd(low, low));
      norm_ = _mm512_mask_add_pd(norm_, static_cast<__mmask8>(finite >> 8), norm_, _mm512_mul_pd(high, high));
      return;
    }
    const __mmask16 skipped = static_cast<__mmask16>(lanes & not_finite);
    if (__builtin_expect(skipped == 0, 1)) {
      // The common case: every gradient finite, so nothing to mask or keep.
      write<kFull, false>(e, lanes, g, p, old, q);
    } else {
      bad_ += __builtin_popcount(static_cast<unsigned>(skipped));
      write<kFull, true>(e, lanes, _mm512_maskz_mov_ps(static_cast<__mmask16>(~not_finite), g), p, old, q,
                         static_cast<__mmask16>(lanes & ~not_finite));
    }
  }

  // The float32 values the parameters of 16 lanes stand for: as stored or,
  // compensated, the bfloat16 bits with their error codes (weight_error_simd.h).
  template <bool kFull>
  __attribute__((always_inline)) __m512 read_param(int64_t e, __mmask16 lanes) {
    const __m512 p = kFull ? load16(param_ + e) : load16(param_ + e, lanes);
    if constexpr (kBf16) {
      if (errors_ != nullptr) {
        return compensated_values16(error_format_, _mm512_castps_si512(p),
                                    load_errors16(error_format_, errors_, e, lanes));
      }
    }
    return p;
  }

  // Stores 16 lanes' parameters and, compensated, the error codes of the
  // bfloat16 write (round to nearest even).
  __attribute__((always_inline)) void write_param(int64_t e, __mmask16 lanes, __m512 value) {
    if constexpr (kBf16) {
      if (errors_ != nullptr) {
        const __m512i rounded = bfloat16_lanes(value);
        _mm256_mask_storeu_epi16(param_ + e, lanes, _mm512_cvtepi32_epi16(rounded));
        store_errors16(error_format_, errors_, e, lanes,
                       weight_errors16(error_format_, value, _mm512_slli_epi32(rounded, 16)));
        return;
      }
    }
    store_param(param_ + e, value, lanes, call_, seg_.first_index + start_ + e);
  }

  // The rule's direction for 16 lanes; the new states go to `state` (when not null).
  __attribute__((always_inline)) Vec16 direction(__m512 g, __m512 p, const __m512 (*old)[4], int q, Vec16* state) {
    Vec16 scratch[kSlots];
    Vec16* out = state != nullptr ? state : scratch;
    for (int k = 0; k < NS; ++k) out[k] = Vec16(old[k][q]);
    return update_value<Vec16>(R, W, call_.c, Vec16(g), Vec16(p), out, NS, seg_.lr);
  }

  // Step 16 lanes and write the parameter and the states. kMasked: some lanes have a
  // non-finite gradient (g is 0 there) and keep their parameter and old states.
  template <bool kFull, bool kMasked>
  __attribute__((always_inline)) void write(int64_t e, __mmask16 lanes, __m512 g, __m512 p, const __m512 (*old)[4],
                                            int q, __mmask16 finite = 0) {
    Vec16 state[kSlots];
    const Vec16 d = direction(g, p, old, q, state);
    const Vec16 stepped = apply_direction_value<Vec16>(Vec16(p), call_.decay, write_rate(R, seg_.lr), d);
    write_param(e, lanes, kMasked ? _mm512_mask_blend_ps(finite, p, stepped.v) : stepped.v);
    for (int k = 0; k < NS; ++k) {
      const __m512 value = kMasked ? _mm512_mask_blend_ps(finite, old[k][q], state[k].v) : state[k].v;
      if (kQuant) {
        _mm512_store_ps(kept_[k] + e, value);
        const __m512i magnitude = _mm512_and_si512(_mm512_castps_si512(value), _mm512_set1_epi32(static_cast<int>(kAbsMask)));
        absmax_[k] = kFull ? _mm512_max_epu32(absmax_[k], magnitude)
                           : _mm512_mask_max_epu32(absmax_[k], lanes, absmax_[k], magnitude);
      } else {
        float* out = static_cast<float*>(seg_.state[k]) + start_ + e;
        if (kFull) {
          _mm512_storeu_ps(out, value);
        } else {
          _mm512_mask_storeu_ps(out, lanes, value);
        }
      }
    }
  }

  const Call& call_;
  const Segment& seg_;
  const int64_t u_;
  const int64_t block_;  // index of the unit in its segment
  const int64_t start_;  // its first element
  const int64_t len_;
  P* const param_;
  const char* const grad_;  // the unit's first gradient
  float (*const kept_)[kMaxBlock];
  const __m512 grad_scale_;
  char* const errors_;  // compensated bfloat16: the unit's first error code, else nullptr
  const ErrorFormat16 error_format_;
  float scale_[kSlots] = {};  // quantized: the old absmax of each slot
  __m512 scaled_code_[kSlots];  // 4-bit: code[c] * scale_, c = 0..15
  __m512i absmax_[kSlots];    // quantized: max of |kept value| bits so far
  __m512d norm_ = _mm512_setzero_pd();
  int64_t bad_ = 0;
};

template <Rule R, WeightDecayMode W, int NS, bool kQuant, bool kNorm, typename P>
void unit_avx512(const Call& call, const Segment& seg, int64_t u, float (*kept)[kMaxBlock], int64_t* nonfinite) {
  if constexpr (kNorm) {
    UnitAvx512<R, W, NS, kQuant, kNorm, P, AnyFloat>(call, seg, u, kept).run(nonfinite);
  } else {
    binding::visit_torch_float(seg.grad_kind, [&](auto tag) {
      UnitAvx512<R, W, NS, kQuant, kNorm, P, typename decltype(tag)::type>(call, seg, u, kept).run(nonfinite);
    });
  }
}
#endif  // D8_AVX512

#if D8_AVX2
// ---------------------------------------------------------------------------
// AVX2 units (no AVX-512): 8 lanes, for the step and the norm passes.

// 8 float32 lanes with lane-wise IEEE operations, as Vec16 above.
struct Vec8 {
  __m256 v;
  Vec8() = default;
  explicit Vec8(float x) : v(_mm256_set1_ps(x)) {}
  explicit Vec8(__m256 x) : v(x) {}
};

D8_VEC_OPERATOR(Vec8, _mm256_set1_ps, +, _mm256_add_ps)
D8_VEC_OPERATOR(Vec8, _mm256_set1_ps, -, _mm256_sub_ps)
D8_VEC_OPERATOR(Vec8, _mm256_set1_ps, *, _mm256_mul_ps)
D8_VEC_OPERATOR(Vec8, _mm256_set1_ps, /, _mm256_div_ps)

__attribute__((always_inline)) inline Vec8 sqrt_value(Vec8 x) { return Vec8(_mm256_sqrt_ps(x.v)); }

// (x > 0) - (x < 0) as float: 1, -1, or +0 (for +-0 and NaN).
__attribute__((always_inline)) inline Vec8 sign_value(Vec8 x) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 positive = _mm256_and_ps(_mm256_cmp_ps(x.v, zero, _CMP_GT_OQ), _mm256_set1_ps(1.0f));
  const __m256 negative = _mm256_and_ps(_mm256_cmp_ps(x.v, zero, _CMP_LT_OQ), _mm256_set1_ps(-1.0f));
  return Vec8(_mm256_or_ps(positive, negative));
}

// The gradient of elements i .. i + 7 (G: a dtype, or AnyFloat).
template <typename G>
__attribute__((always_inline)) inline __m256 load_grad8(const void* base, FloatType, int64_t i) {
  return load8(static_cast<const G*>(base) + i);
}
template <>
__attribute__((always_inline)) inline __m256 load_grad8<AnyFloat>(const void* base, FloatType kind, int64_t i) {
  return binding::visit_torch_float(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return load8(static_cast<const T*>(base) + i);
  });
}

// One unit, 8 elements at a time and its last len % 8 one by one
// (step_element, unit_scalar's arithmetic); then the quantized slots' codes.
// Compensated and stochastic bfloat16 writes take avx2_simd.h's 8-lane forms of
// weight_error.h and stochastic_rounding.h. kNorm: the sum of d * d over the
// finite gradients goes to call.unit_norms[u], and nothing is written.
template <Rule R, WeightDecayMode W, int NS, bool kQuant, bool kNorm, typename P, typename G>
void unit_avx2(const Call& call, const Segment& seg, int64_t u, float (*kept)[kMaxBlock], int64_t* nonfinite) {
  constexpr int kSlots = NS > 0 ? NS : 1;
  const int64_t b = u - seg.first_unit;
  const int64_t start = b * call.unit;
  const int64_t len = std::min(call.unit, seg.numel - start);
  P* param = static_cast<P*>(seg.param) + start;
  const char* grad = static_cast<const char*>(seg.grad) + start * grad_bytes<G>(seg.grad_kind);
  const uint8_t* codes[kSlots] = {};  // quantized: the slot's codes of the segment (not of the unit)
  float* state32[kSlots] = {};
  float scale[kSlots] = {};
  __m256 vscale[kSlots];
  std::optional<ScaledNibbleCode8> nibble_code[kSlots];
  __m256i absmax[kSlots];
  for (int k = 0; k < NS; ++k) {
    if (kQuant) {
      codes[k] = static_cast<const uint8_t*>(seg.state[k]);
      scale[k] = seg.absmax[k][b];
      if (call.four_bit) nibble_code[k].emplace(call.slot[k].book.code, scale[k]);
    } else {
      state32[k] = static_cast<float*>(seg.state[k]) + start;
    }
    vscale[k] = _mm256_set1_ps(scale[k]);
    absmax[k] = _mm256_setzero_si256();
  }
  constexpr bool kBf16 = std::is_same_v<P, c10::BFloat16>;
  // Compensated bfloat16: the unit's first error code (int8 or int16), else nullptr.
  char* const errors = kBf16 && call.errors.enabled() ? static_cast<char*>(seg.errors) + start * call.errors.bytes()
                                                      : nullptr;
  const ErrorFormat8 error_format(call.errors.bits, call.errors.format);
  const __m256 grad_scale = _mm256_set1_ps(seg.grad_scale);
  const __m256i magnitude_mask = _mm256_set1_epi32(static_cast<int>(kAbsMask));
  const float rate = write_rate(R, seg.lr);
  __m256d norm_low = _mm256_setzero_pd(), norm_high = _mm256_setzero_pd();
  int64_t bad = 0;
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256 g = load_grad8<G>(grad, seg.grad_kind, i);
    if (call.has_grad_scale) g = _mm256_mul_ps(g, grad_scale);
    const __m256 skip = _mm256_castsi256_ps(not_finite8(g));
    g = _mm256_andnot_ps(skip, g);  // a non-finite gradient counts as 0
    __m256 p = load8(param + i);
    if (kBf16 && errors != nullptr) {
      p = compensated_values8(error_format, _mm256_castps_si256(p), load_errors8(error_format, errors, i));
    }
    Vec8 old[kSlots], state[kSlots];
    for (int k = 0; k < NS; ++k) {
      if (kQuant && call.four_bit) {
        old[k] = Vec8(decode_nibbles8(codes[k] + (start + i) / 2, *nibble_code[k]));
      } else if (kQuant) {
        old[k] = Vec8(decode8(call.slot[k].book.code, codes[k] + start + i, vscale[k]));
      } else {
        old[k] = Vec8(_mm256_loadu_ps(state32[k] + i));
      }
      state[k] = old[k];
    }
    const Vec8 d = update_value<Vec8>(R, W, call.c, Vec8(g), Vec8(p), state, NS, seg.lr);
    if constexpr (kNorm) {
      const __m256 counted = _mm256_andnot_ps(skip, d.v);  // 0 where the gradient is not finite
      const __m256d low = _mm256_cvtps_pd(_mm256_castps256_ps128(counted));
      const __m256d high = _mm256_cvtps_pd(_mm256_extractf128_ps(counted, 1));
      norm_low = _mm256_add_pd(norm_low, _mm256_mul_pd(low, low));
      norm_high = _mm256_add_pd(norm_high, _mm256_mul_pd(high, high));
      continue;
    }
    const Vec8 stepped = apply_direction_value<Vec8>(Vec8(p), call.decay, rate, d);
    bad += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(skip)));
    const __m256 written = _mm256_blendv_ps(stepped.v, p, skip);
    if constexpr (kBf16) {
      if (errors != nullptr) {
        // The write rounds to nearest even, and the error code is that rounding's (weight_error.h).
        const __m256i rounded = bfloat16_lanes8(written);
        store_low_halves8(param + i, rounded);
        store_errors8(error_format, errors, i, weight_errors8(error_format, written, _mm256_slli_epi32(rounded, 16)));
      } else if (call.stochastic) {
        store8_stochastic(param + i, written, call.key, seg.first_index + start + i);
      } else {
        store8(param + i, written);
      }
    } else {
      store8(param + i, written);
    }
    for (int k = 0; k < NS; ++k) {
      const __m256 value = _mm256_blendv_ps(state[k].v, old[k].v, skip);
      if (kQuant) {
        _mm256_storeu_ps(kept[k] + i, value);
        absmax[k] = _mm256_max_epu32(absmax[k], _mm256_and_si256(_mm256_castps_si256(value), magnitude_mask));
      } else {
        _mm256_storeu_ps(state32[k] + i, value);
      }
    }
  }
  const int64_t tail = i;
  double norm = 0.0;
  for (; i < len; ++i) step_element<R, W, NS, kQuant, kNorm, P>(call, seg, start, i, scale, kept, &norm, &bad);
  if constexpr (kNorm) {
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, _mm256_add_pd(norm_low, norm_high));
    call.unit_norms[u] = norm + ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]));
    return;
  }
  *nonfinite += bad;
  if (kQuant) {
    for (int k = 0; k < NS; ++k) {
      alignas(32) uint32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), absmax[k]);
      uint32_t bits = absmax_bits_portable(kept[k] + tail, len - tail);
      for (uint32_t lane : lanes) bits = std::max(bits, lane);
      const float block_absmax = absmax_from_bits(bits);
      seg.absmax[k][b] = block_absmax;
      encode_state(call.slot[k], call.four_bit, kept[k], len, block_absmax,
                   codes_at(seg.state[k], call.four_bit, start));
    }
  }
}
#endif  // D8_AVX2
#undef D8_VEC_OPERATOR

// ---------------------------------------------------------------------------
// Units [first, last) of the call, in order, on one thread.

using RangeFn = void (*)(const Call&, int64_t, int64_t, int64_t, int64_t*);

template <Rule R, WeightDecayMode W, int NS, bool kQuant, bool kNorm, typename P>
void run_units(const Call& call, int64_t num_segments, int64_t first, int64_t last, int64_t* nonfinite) {
  alignas(64) float kept[kQuant && NS > 0 ? NS : 1][kMaxBlock];  // quantized: the kept states of one block
  // The segment holding unit `first`: the last one starting at or before it.
  const Segment* segments = call.segments;
  int64_t s = std::upper_bound(segments, segments + num_segments, first,
                               [](int64_t u, const Segment& seg) { return u < seg.first_unit; }) -
              segments - 1;
  for (int64_t u = first; u < last; ++u) {
    while (u >= segments[s].first_unit + segments[s].units) ++s;
#if D8_AVX512
    unit_avx512<R, W, NS, kQuant, kNorm, P>(call, segments[s], u, kept, nonfinite);
#elif D8_AVX2
    if constexpr (kNorm) {
      unit_avx2<R, W, NS, kQuant, kNorm, P, AnyFloat>(call, segments[s], u, kept, nonfinite);
    } else {
      binding::visit_torch_float(segments[s].grad_kind, [&](auto tag) {
        unit_avx2<R, W, NS, kQuant, kNorm, P, typename decltype(tag)::type>(call, segments[s], u, kept, nonfinite);
      });
    }
#else
    unit_scalar<R, W, NS, kQuant, kNorm, P>(call, segments[s], u, kept, nonfinite);
#endif
  }
}

template <Rule R, WeightDecayMode W, int NS, bool kQuant>
RangeFn pick_dtype(bool norm, FloatType param_type) {
  return binding::visit_torch_float(param_type, [norm](auto tag) -> RangeFn {
    using P = typename decltype(tag)::type;
    return norm ? &run_units<R, W, NS, kQuant, true, P> : &run_units<R, W, NS, kQuant, false, P>;
  });
}

template <Rule R, WeightDecayMode W, int NS>
RangeFn pick_precision(bool quantized, bool norm, FloatType param_type) {
  if constexpr (NS > 0) {
    if (quantized) return pick_dtype<R, W, NS, true>(norm, param_type);
  }
  return pick_dtype<R, W, NS, false>(norm, param_type);
}

// Only Adam reads kInDirection; the other rules only ask "L2 or not", and Lion
// and AdEMAMix not even that, so they are instantiated for fewer modes.
template <Rule R, int NS>
RangeFn pick_wd_mode(WeightDecayMode wd_mode, bool quantized, bool norm, FloatType param_type) {
  if constexpr (R == Rule::kAdam) {
    switch (wd_mode) {
      case WeightDecayMode::kL2:
        return pick_precision<R, WeightDecayMode::kL2, NS>(quantized, norm, param_type);
      case WeightDecayMode::kDecoupled:
        return pick_precision<R, WeightDecayMode::kDecoupled, NS>(quantized, norm, param_type);
      default:
        return pick_precision<R, WeightDecayMode::kInDirection, NS>(quantized, norm, param_type);
    }
  } else if constexpr (R == Rule::kLion || R == Rule::kAdemamix) {
    return pick_precision<R, WeightDecayMode::kDecoupled, NS>(quantized, norm, param_type);
  } else {
    return wd_mode == WeightDecayMode::kL2
               ? pick_precision<R, WeightDecayMode::kL2, NS>(quantized, norm, param_type)
               : pick_precision<R, WeightDecayMode::kDecoupled, NS>(quantized, norm, param_type);
  }
}

// The instantiation for a rule and state count, or nullptr when the rule does not take that many states.
RangeFn pick(Rule rule, WeightDecayMode wd_mode, int num_states, bool quantized, bool norm, FloatType param_type) {
  return visit_rule_states(rule, num_states, RangeFn{nullptr}, [&](auto r, auto ns) {
    return pick_wd_mode<decltype(r)::value, decltype(ns)::value>(wd_mode, quantized, norm, param_type);
  });
}

// ---------------------------------------------------------------------------
// Operator: check (binding/kernel_contract.h), tables, segments, run, results.

// The encode and decode tables of the used quantized slots, built once per
// call; the call's SlotCode records point into them, so they must outlive the run.
class SlotTables {
 public:
  SlotTables(const binding::FusedStepCall& checked, Call* call) {
    if (!checked.quantized()) return;
#if D8_AVX512
    encode_.reserve(kMaxStates);
    nibble_.reserve(kMaxStates);
#endif
#if D8_AVX512_VBMI
    decode_.reserve(kMaxStates);
#endif
#if D8_AVX2
    nibble8_.reserve(kMaxStates);
#endif
    for (int k = 0; k < checked.num_states; ++k) {
      SlotCode& slot = call->slot[k];
      slot.book = checked.books[k];
      slot.zero_code = static_cast<uint8_t>(slot.book.nearest(0.0f));
      if (call->four_bit) {
#if D8_AVX512
        nibble_.emplace_back(slot.book.code, slot.book.thresholds);
        slot.nibble = &nibble_.back();
#elif D8_AVX2
        nibble8_.emplace_back(slot.book.thresholds);
        slot.nibble8 = &nibble8_.back();
#endif
        continue;
      }
#if D8_AVX512
      encode_.emplace_back(slot.book.thresholds, slot.book.encoder);
      slot.encode = &encode_.back();
#endif
#if D8_AVX512_VBMI
      decode_.emplace_back(slot.book.code);
      slot.decode = &decode_.back();
#endif
    }
  }
  SlotTables(const SlotTables&) = delete;
  SlotTables& operator=(const SlotTables&) = delete;

 private:
#if D8_AVX512
  std::vector<EncodeTables> encode_;
  std::vector<NibbleTables> nibble_;
#endif
#if D8_AVX512_VBMI
  std::vector<DecodeTables> decode_;
#endif
#if D8_AVX2
  std::vector<NibbleTables8> nibble8_;
#endif
};

// What every segment shares, from the checked arguments.
Call make_call(const binding::FusedStepCall& checked, int64_t blocksize, std::optional<int64_t> seed) {
  Call call{};
  call.c = checked.hyper;
  call.decay = call.c.v[kDecay];
  call.unit = checked.quantized() ? blocksize : kChunk32;
  call.four_bit = checked.state_bits == 4;
  call.has_grad_scale = checked.grad_scale != nullptr;
  call.stochastic = seed.has_value() && checked.param_type == FloatType::kBFloat16;
  call.key = call.stochastic ? seed_key(static_cast<uint64_t>(*seed)) : 0u;
  if (checked.compensated()) call.errors = ErrorLayout{checked.error_bits, WeightErrorFormat::for_bits(checked.error_bits)};
  return call;
}

// The segments' records and unit numbering; returns the call's unit count.
int64_t fill_segments(const binding::FusedStepCall& checked, const Call& call,
                      c10::ArrayRef<int64_t> segment_offsets, std::vector<Segment>* segments) {
  const float* grad_scales = checked.grad_scale != nullptr ? checked.grad_scale->const_data_ptr<float>() : nullptr;
  const float* update_scales =
      checked.update_scale != nullptr ? checked.update_scale->const_data_ptr<float>() : nullptr;
  int64_t total_units = 0;
  segments->resize(static_cast<size_t>(checked.num_segments));
  for (int64_t k = 0; k < checked.num_segments; ++k) {
    const at::Tensor& param = checked.tensors->params[k];
    const at::Tensor& grad = checked.tensors->grads[k];
    Segment& seg = (*segments)[static_cast<size_t>(k)];
    seg.param = param.mutable_data_ptr();
    seg.grad = grad.const_data_ptr();
    binding::float_type_of(grad.scalar_type(), &seg.grad_kind);
    for (int s = 0; s < checked.num_states; ++s) {
      seg.state[s] = checked.state(s, k).mutable_data_ptr();
      seg.absmax[s] = checked.quantized() ? checked.absmax(s, k).mutable_data_ptr<float>() : nullptr;
    }
    seg.errors = checked.compensated() ? checked.error(k).mutable_data_ptr() : nullptr;
    seg.numel = param.numel();
    seg.first_index = call.stochastic ? segment_offsets[k] : 0;
    seg.grad_scale = grad_scales != nullptr ? grad_scales[k] : 1.0f;
    seg.lr = update_scales != nullptr ? call.c.v[kLr] * update_scales[k] : call.c.v[kLr];
    seg.first_unit = total_units;
    seg.units = block_count(seg.numel, call.unit);
    total_units += seg.units;
  }
  return total_units;
}

// Runs every unit; returns the count of non-finite gradients. Threads take
// chunks of units from a shared counter, in order, so that a thread slowed
// down (by another process, or a sibling hyperthread) leaves its share to the
// others instead of holding up the call.
int64_t run_all_units(RangeFn run, const Call& call, int64_t num_segments, int64_t total_units) {
  if (total_units == 0) return 0;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t min_units = std::max<int64_t>(1, kMinChunkElements / call.unit);
  const int64_t max_units = std::max<int64_t>(1, kMaxChunkElements / call.unit);
  const int64_t chunk = std::clamp<int64_t>(total_units / (kChunksPerThread * threads), min_units, max_units);
  const int64_t tasks = std::min(threads, (total_units + chunk - 1) / chunk);
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> nonfinite{0};
  at::parallel_for(0, tasks, 1, [&](int64_t first_task, int64_t last_task) {
    int64_t count = 0;
    for (int64_t task = first_task; task < last_task; ++task) {
      for (int64_t first = next.fetch_add(chunk, std::memory_order_relaxed); first < total_units;
           first = next.fetch_add(chunk, std::memory_order_relaxed)) {
        run(call, num_segments, first, std::min(first + chunk, total_units), &count);
      }
    }
    if (count != 0) nonfinite.fetch_add(count, std::memory_order_relaxed);
  });
  return nonfinite.load();
}

// Norm mode: each segment's partial sums, added in unit order (independent of the thread count).
void write_norms(const std::vector<Segment>& segments, const std::vector<double>& unit_norms, double* out) {
  for (size_t k = 0; k < segments.size(); ++k) {
    double sum = 0.0;
    for (int64_t u = segments[k].first_unit; u < segments[k].first_unit + segments[k].units; ++u) sum += unit_norms[u];
    out[k] = sum;
  }
}

// The CPU backend of binding::fused_step_op: each gradient may have its own dtype.
struct FusedStepCpu {
  static constexpr binding::BackendInfo kInfo = {"dist8bit CPU kernel", at::kCPU, /*mixed_grads=*/true,
                                                 /*four_bit=*/true, /*compensated=*/true};

  static void fused_step(const binding::FusedStepCall& checked, c10::ArrayRef<int64_t> segment_offsets,
                         int64_t blocksize, std::optional<int64_t> seed) {
    const RangeFn run = pick(checked.rule, checked.wd_mode, checked.num_states, checked.quantized(),
                             checked.norm_out != nullptr, checked.param_type);
    TORCH_INTERNAL_ASSERT(run != nullptr, "check_fused_step let through a rule with ", checked.num_states, " slots");
    Call call = make_call(checked, blocksize, seed);
    const SlotTables tables(checked, &call);
    std::vector<Segment> segments;
    const int64_t total_units = fill_segments(checked, call, segment_offsets, &segments);
    call.segments = segments.data();
    std::vector<double> unit_norms(checked.norm_out != nullptr ? static_cast<size_t>(total_units) : 0);
    call.unit_norms = unit_norms.data();
    const int64_t nonfinite = run_all_units(run, call, checked.num_segments, total_units);
    if (checked.norm_out != nullptr) {
      write_norms(segments, unit_norms, checked.norm_out->mutable_data_ptr<double>());
    } else if (checked.nonfinite_count != nullptr) {
      checked.nonfinite_count->mutable_data_ptr<int64_t>()[0] += nonfinite;
    }
  }
};

}  // namespace
}  // namespace cpu
}  // namespace dist8bit

TORCH_LIBRARY_IMPL(dist8bit, CPU, m) {
  m.impl("fused_step", &dist8bit::binding::fused_step_op<dist8bit::cpu::FusedStepCpu>);
}
