// CUDA kernels of rectok_fast::patchify / rectok_fast::unpatchify.
//
// Layout (both contiguous):
//   image  (B, C, H, W)             H = gh*p, W = gw*p
//   tokens (B, T, C, p, p)          = (B, T, C*p*p); T = gh*gw, or K with ids_keep (B, K)
// Token (b, t) is grid cell n = ids_keep[b, t] (or t), gy = n / gw, gx = n % gw, and its element
// (c, py, px) is image[b, c, gy*p + py, gx*p + px].
//
// The ops are pure copies, so the kernel moves "units" of U bytes (U in {2, 4, 8, 16}, i.e. up to
// 128-bit vector loads/stores): U is the largest width such that p*E, W*E and both base pointers
// are multiples of U (E = element size), so a unit never straddles a patch row.  One thread per
// token unit; thread i handles token unit i, so the token side is fully coalesced, and on the
// image side a warp reads/writes runs of p*E contiguous bytes (64 B for fp32 at p = 16).
// unpatchify with ids_keep (the backward of patchify with ids_keep) writes every image unit exactly
// once from an inverse map instead of zero-filling the image and scattering the tokens into it:
// inverse_ids_kernel builds inv[b, n] (the token on grid cell n, -1 if none; atomicMax, so repeated
// ids resolve deterministically to the last one), then one thread per image unit copies from its
// token or writes zero (the image side fully coalesced).  The CPU path (patchify_cpu.cpp) runs the
// same algorithm.
// Index math is int32 when every offset fits, else int64 (template).  The kernel is dtype-agnostic;
// the dtype is checked against fp32/fp64/fp16/bf16.  Out-of-range ids never touch memory: the
// patchify output for such a token is zero and unpatchify skips it (the Python launcher range-checks
// ids before launch, so this is only a guard against crashes, not a silent path).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

namespace rectok_fast {
namespace {

#define RF_CHECK_CUDA(x, name) TORCH_CHECK((x).is_cuda(), name " must be a CUDA tensor, got ", (x).device())
#define RF_CHECK_CONTIGUOUS(x, name) TORCH_CHECK((x).is_contiguous(), name " must be contiguous")
#define RF_CHECK_FLOAT(x, name)                                                                          \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble ||                     \
                  (x).scalar_type() == at::kHalf || (x).scalar_type() == at::kBFloat16,                  \
              name " must be float32/float64/float16/bfloat16, got ", (x).scalar_type())

constexpr int kThreads = 256;

// kToTokens: image -> tokens (patchify), else tokens -> image (unpatchify).  All sizes in units
// except p, C, T, gw, n_cells.  Pointers:
//   image  (B, C, H, Wu) units       tokens (B*T*C*p*pu) units       ids (B, T) int64 or nullptr
template <typename Unit, typename Index, bool kToTokens>
__global__ void patch_copy_kernel(Unit* __restrict__ image, Unit* __restrict__ tokens,
                                  const int64_t* __restrict__ ids, int64_t total, Index T, Index C, Index p,
                                  Index pu, Index H, Index Wu, Index gw, Index n_cells) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i64 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i64 < total; i64 += stride) {
    const Index i = static_cast<Index>(i64);
    Index r = i / pu;
    const Index pxu = i - r * pu;
    Index q = r / p;
    const Index py = r - q * p;
    r = q / C;
    const Index c = q - r * C;  // r = b*T + t
    const Index b = r / T;
    const Index t = r - b * T;
    const int64_t id = ids ? ids[r] : 0;
    const bool valid = !ids || (id >= 0 && id < static_cast<int64_t>(n_cells));
    const Index n = ids ? (valid ? static_cast<Index>(id) : Index(0)) : t;  // no arithmetic on a bad id
    const Index gy = n / gw;
    const Index gx = n - gy * gw;
    const Index img = ((b * C + c) * H + gy * p + py) * Wu + gx * pu + pxu;
    if (kToTokens) {
      Unit v;
      if (valid) {
        v = image[img];
      } else {
        v = Unit{};
      }
      tokens[i] = v;
    } else if (valid) {
      image[img] = tokens[i];
    }
  }
}

// inv (B, n_cells) int32, pre-filled with -1: inv[b, ids[b, t]] = max t.  Out-of-range ids skipped.
__global__ void inverse_ids_kernel(const int64_t* __restrict__ ids, int32_t* __restrict__ inv, int64_t B, int64_t T,
                                   int64_t n_cells) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < B * T; i += stride) {
    const int64_t n = ids[i];
    if (n >= 0 && n < n_cells) atomicMax(inv + (i / T) * n_cells + n, static_cast<int32_t>(i % T));
  }
}

// One thread per image unit i of (B, C, H, Wu): grid cell n = (y / p) * gw + xu / pu, token t =
// inv[b, n]; the unit is tokens[b, t, c, y % p, xu % pu] or zero.  Pointers:
//   image (B, C, H, Wu) units (written)   tokens (B, T, C, p, pu) units   inv (B, n_cells) int32
template <typename Unit, typename Index>
__global__ void unpatch_from_inverse_kernel(Unit* __restrict__ image, const Unit* __restrict__ tokens,
                                            const int32_t* __restrict__ inv, int64_t total, Index T, Index C,
                                            Index p, Index pu, Index H, Index Wu, Index gw, Index n_cells) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i64 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i64 < total; i64 += stride) {
    const Index i = static_cast<Index>(i64);
    Index r = i / Wu;
    const Index xu = i - r * Wu;
    Index q = r / H;
    const Index y = r - q * H;
    const Index b = q / C;
    const Index c = q - b * C;
    const Index gy = y / p, py = y - gy * p;
    const Index gx = xu / pu, pxu = xu - gx * pu;
    const int32_t t = inv[static_cast<int64_t>(b) * n_cells + gy * gw + gx];
    Unit v = Unit{};
    if (t >= 0) v = tokens[(((b * T + t) * C + c) * p + py) * pu + pxu];
    image[i] = v;
  }
}

template <typename Unit>
void launch_inverse_typed(const at::Tensor& image, const at::Tensor& tokens, const at::Tensor& inv, int64_t p,
                          int64_t E) {
  constexpr int64_t U = sizeof(Unit);
  const int64_t V = U / E;  // elements per unit
  const int64_t C = image.size(1), H = image.size(2), W = image.size(3);
  const int64_t T = tokens.size(1), gw = W / p, n_cells = inv.size(1);
  const int64_t pu = p / V, Wu = W / V;
  const int64_t total = image.numel() / V;
  const int64_t max_off = std::max<int64_t>(image.numel(), tokens.numel()) / V;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 30);
  auto stream = c10::cuda::getCurrentCUDAStream();
  Unit* img = reinterpret_cast<Unit*>(image.data_ptr());
  const Unit* tok = reinterpret_cast<const Unit*>(tokens.data_ptr());
  const int32_t* iv = inv.data_ptr<int32_t>();
  if (max_off < std::numeric_limits<int32_t>::max() && inv.numel() < std::numeric_limits<int32_t>::max()) {
    unpatch_from_inverse_kernel<Unit, int32_t><<<blocks, kThreads, 0, stream>>>(
        img, tok, iv, total, int32_t(T), int32_t(C), int32_t(p), int32_t(pu), int32_t(H), int32_t(Wu), int32_t(gw),
        int32_t(n_cells));
  } else {
    unpatch_from_inverse_kernel<Unit, int64_t>
        <<<blocks, kThreads, 0, stream>>>(img, tok, iv, total, T, C, p, pu, H, Wu, gw, n_cells);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The widest unit U (bytes) with p*E, W*E and both base pointers multiples of U.
int64_t unit_bytes(const at::Tensor& image, const at::Tensor& tokens, int64_t p) {
  const int64_t E = image.element_size();
  const int64_t W = image.size(3);
  const auto a = reinterpret_cast<std::uintptr_t>(image.data_ptr());
  const auto bptr = reinterpret_cast<std::uintptr_t>(tokens.data_ptr());
  int64_t U = 16;
  for (; U > E; U /= 2) {
    if ((p * E) % U == 0 && (W * E) % U == 0 && a % U == 0 && bptr % U == 0) break;
  }
  return U;
}

// image (B, C, gh*p, gw*p) <- tokens (B, T, C*p*p) through ids (B, T): every image unit written once.
void unpatch_from_ids(const at::Tensor& image, const at::Tensor& tokens, const at::Tensor& ids, int64_t p,
                      int64_t n_cells) {
  RF_CHECK_CONTIGUOUS(image, "image");
  RF_CHECK_CONTIGUOUS(tokens, "tokens");
  const int64_t B = ids.size(0), T = ids.size(1);
  at::Tensor inv = at::full({B, n_cells}, -1, ids.options().dtype(at::kInt));
  if (B * T > 0) {
    const int64_t blocks = std::min<int64_t>((B * T + kThreads - 1) / kThreads, int64_t(1) << 30);
    inverse_ids_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ids.data_ptr<int64_t>(), inv.data_ptr<int32_t>(), B, T, n_cells);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t E = image.element_size();
  switch (unit_bytes(image, tokens, p)) {
    case 16:
      launch_inverse_typed<uint4>(image, tokens, inv, p, E);
      break;
    case 8:
      launch_inverse_typed<uint2>(image, tokens, inv, p, E);
      break;
    case 4:
      launch_inverse_typed<unsigned int>(image, tokens, inv, p, E);
      break;
    default:
      launch_inverse_typed<unsigned short>(image, tokens, inv, p, E);
      break;
  }
}

template <typename Unit, bool kToTokens>
void launch_typed(const at::Tensor& image, const at::Tensor& tokens, const int64_t* ids, int64_t p, int64_t n_cells,
                  int64_t E) {
  constexpr int64_t U = sizeof(Unit);
  const int64_t V = U / E;  // elements per unit
  const int64_t B = image.size(0), C = image.size(1), H = image.size(2), W = image.size(3);
  const int64_t T = tokens.size(1), gw = W / p;
  const int64_t pu = p / V, Wu = W / V;
  const int64_t total = tokens.numel() / V;
  const int64_t max_off = std::max<int64_t>(image.numel(), tokens.numel()) / V;
  (void)B;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 30);
  auto stream = c10::cuda::getCurrentCUDAStream();
  Unit* img = reinterpret_cast<Unit*>(image.data_ptr());
  Unit* tok = reinterpret_cast<Unit*>(tokens.data_ptr());
  if (max_off < std::numeric_limits<int32_t>::max() && n_cells < std::numeric_limits<int32_t>::max()) {
    patch_copy_kernel<Unit, int32_t, kToTokens><<<blocks, kThreads, 0, stream>>>(
        img, tok, ids, total, int32_t(T), int32_t(C), int32_t(p), int32_t(pu), int32_t(H), int32_t(Wu), int32_t(gw),
        int32_t(n_cells));
  } else {
    patch_copy_kernel<Unit, int64_t, kToTokens>
        <<<blocks, kThreads, 0, stream>>>(img, tok, ids, total, T, C, p, pu, H, Wu, gw, n_cells);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kToTokens>
void launch(const at::Tensor& image, const at::Tensor& tokens, const int64_t* ids, int64_t p, int64_t n_cells) {
  RF_CHECK_CONTIGUOUS(image, "image");
  RF_CHECK_CONTIGUOUS(tokens, "tokens");
  const int64_t E = image.element_size();
  switch (unit_bytes(image, tokens, p)) {
    case 16:
      launch_typed<uint4, kToTokens>(image, tokens, ids, p, n_cells, E);
      break;
    case 8:
      launch_typed<uint2, kToTokens>(image, tokens, ids, p, n_cells, E);
      break;
    case 4:
      launch_typed<unsigned int, kToTokens>(image, tokens, ids, p, n_cells, E);
      break;
    default:
      launch_typed<unsigned short, kToTokens>(image, tokens, ids, p, n_cells, E);
      break;
  }
}

// Products of sizes without int64 overflow (also for empty inputs with a huge p).
int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(!c10::mul_overflows(a, b, &r), what, " overflows int64 (", a, " * ", b, ")");
  return r;
}

at::Tensor check_ids(const at::Tensor& ids, const at::Tensor& like, int64_t B, int64_t K) {
  TORCH_CHECK(ids.device() == like.device(), "ids_keep is on ", ids.device(), " but the data is on ", like.device(),
              "; move them to one device");
  RF_CHECK_CUDA(ids, "ids_keep");
  TORCH_CHECK(ids.scalar_type() == at::kLong, "ids_keep must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B && (K < 0 || ids.size(1) == K), "ids_keep must have shape (", B,
              ", ", K < 0 ? "K" : std::to_string(K), "), got ", ids.sizes());
  return ids.contiguous();
}

at::Tensor patchify_cuda(const at::Tensor& images_in, int64_t p, const std::optional<at::Tensor>& ids_keep) {
  RF_CHECK_CUDA(images_in, "images");
  RF_CHECK_FLOAT(images_in, "images");
  TORCH_CHECK(images_in.dim() == 4, "images must have shape (B, C, H, W), got ", images_in.sizes());
  TORCH_CHECK(p > 0, "p must be positive, got ", p);
  const int64_t B = images_in.size(0), C = images_in.size(1), H = images_in.size(2), W = images_in.size(3);
  TORCH_CHECK(H % p == 0 && W % p == 0, "images spatial size (", H, ", ", W, ") must be divisible by p = ", p);
  c10::cuda::CUDAGuard guard(images_in.device());
  const int64_t N = (H / p) * (W / p);
  const int64_t D = checked_mul(C, checked_mul(p, p, "p*p"), "C*p*p");
  at::Tensor ids;
  if (ids_keep.has_value()) ids = check_ids(*ids_keep, images_in, B, -1);
  const int64_t T = ids.defined() ? ids.size(1) : N;
  at::Tensor images = images_in.contiguous();
  at::Tensor out = at::empty({B, T, D}, images.options());
  if (out.numel() == 0) return out;
  if (N == 0) return out.zero_();  // empty grid: every id is out of range (the Python side raises first)
  launch<true>(images, out, ids.defined() ? ids.data_ptr<int64_t>() : nullptr, p, N);
  return out;
}

at::Tensor unpatchify_cuda(const at::Tensor& tokens_in, int64_t p, int64_t channels, int64_t gh, int64_t gw,
                           const std::optional<at::Tensor>& ids_keep) {
  RF_CHECK_CUDA(tokens_in, "tokens");
  RF_CHECK_FLOAT(tokens_in, "tokens");
  TORCH_CHECK(tokens_in.dim() == 3, "tokens must have shape (B, T, C*p*p), got ", tokens_in.sizes());
  // channels = 0 is the backward of a patchify of a 0-channel image: empty results
  TORCH_CHECK(p > 0 && channels >= 0 && gh >= 0 && gw >= 0, "need p > 0, channels >= 0, gh >= 0, gw >= 0, got p=", p,
              " channels=", channels, " gh=", gh, " gw=", gw);
  const int64_t B = tokens_in.size(0), T = tokens_in.size(1), N = checked_mul(gh, gw, "gh*gw");
  const int64_t D = checked_mul(channels, checked_mul(p, p, "p*p"), "channels*p*p");
  const int64_t H = checked_mul(gh, p, "gh*p"), W = checked_mul(gw, p, "gw*p");
  TORCH_CHECK(tokens_in.size(2) == D, "tokens last dim must be channels*p*p = ", D, ", got ", tokens_in.size(2));
  c10::cuda::CUDAGuard guard(tokens_in.device());
  at::Tensor ids;
  if (ids_keep.has_value()) {
    ids = check_ids(*ids_keep, tokens_in, B, T);
  } else {
    TORCH_CHECK(T == N, "tokens must have gh*gw = ", N, " tokens, got ", T);
  }
  at::Tensor tokens = tokens_in.contiguous();
  // every element is written exactly once, also with ids_keep (cells no token lands on get zeros)
  at::Tensor out = at::empty({B, channels, H, W}, tokens.options());
  if (out.numel() == 0) return out;
  if (ids.defined()) {
    unpatch_from_ids(out, tokens, ids, p, N);
  } else {
    launch<false>(out, tokens, nullptr, p, N);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rectok_fast, CUDA, m) {
  m.impl("patchify", &patchify_cuda);
  m.impl("unpatchify", &unpatchify_cuda);
}

}  // namespace rectok_fast
