// CPU kernels of rectok_fast::patchify / rectok_fast::unpatchify.
//
// Both ops are pure copies, so the kernels move bytes (element size from the dtype) and are
// dtype-agnostic; the dtype is still checked against the supported set (fp32/fp64/fp16/bf16).
// Layout: image (B, C, H, W) contiguous; tokens (B, T, C, p, p) contiguous, i.e. (B, T, C*p*p).
// Token (b, t) is grid cell n = ids_keep[b, t] (or t), gy = n / gw, gx = n % gw; its (c, py) row of
// p elements is the contiguous image segment images[b, c, gy*p + py, gx*p : gx*p + p], so each
// (b, t, c, py) is one memcpy of p elements.  Rows (b, t) are split over threads.
//
// unpatchify with ids_keep (the backward of patchify with ids_keep) writes every image element
// exactly once from an inverse map (no zero-fill followed by a scatter): inv[b, n] = the token on
// grid cell n, or -1; each image segment of p elements is then a memcpy from its token or a zero
// fill.  The CUDA kernels (patchify_cuda.cu) follow the same algorithm, so these tests cover it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

namespace rectok_fast {
namespace {

#define RF_CHECK_CPU(x, name) TORCH_CHECK((x).device().is_cpu(), name " must be a CPU tensor, got ", (x).device())
#define RF_CHECK_FLOAT(x, name)                                                                          \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble ||                     \
                  (x).scalar_type() == at::kHalf || (x).scalar_type() == at::kBFloat16,                  \
              name " must be float32/float64/float16/bfloat16, got ", (x).scalar_type())

// Checks ids_keep (B, K) int64 with entries unique per row and in [0, n_cells); returns it contiguous.
at::Tensor check_ids(const at::Tensor& ids, const at::Tensor& like, int64_t B, int64_t K, int64_t n_cells) {
  TORCH_CHECK(ids.device() == like.device(), "ids_keep is on ", ids.device(), " but the data is on ", like.device(),
              "; move them to one device");
  RF_CHECK_CPU(ids, "ids_keep");
  TORCH_CHECK(ids.scalar_type() == at::kLong, "ids_keep must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B && (K < 0 || ids.size(1) == K), "ids_keep must have shape (", B,
              ", ", K < 0 ? "K" : std::to_string(K), "), got ", ids.sizes());
  at::Tensor c = ids.contiguous();
  const int64_t k = c.size(1);
  if (B * k == 0) return c;  // nothing to check (and no n_cells-sized scratch for an empty image)
  const int64_t* p = c.data_ptr<int64_t>();
  std::vector<uint8_t> seen(static_cast<size_t>(n_cells));
  for (int64_t b = 0; b < B; ++b) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t n = p[b * k + j];
      TORCH_CHECK(n >= 0 && n < n_cells, "ids_keep[", b, ", ", j, "] = ", n, " is outside [0, ", n_cells, ")");
      TORCH_CHECK(!seen[n], "ids_keep[", b, "] has the duplicate entry ", n, "; entries must be unique per row");
      seen[n] = 1;
    }
  }
  return c;
}

// Copies between image and tokens.  to_tokens: image -> tokens (patchify), else tokens -> image.
void patch_copy(const at::Tensor& image, const at::Tensor& tokens, const int64_t* ids, int64_t p, bool to_tokens) {
  const int64_t B = image.size(0), C = image.size(1), H = image.size(2), W = image.size(3);
  const int64_t T = tokens.size(1), gw = W / p;
  const int64_t E = image.element_size();
  const int64_t row_bytes = C * p * p * E;
  char* img = static_cast<char*>(image.data_ptr());
  char* tok = static_cast<char*>(tokens.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, B * T, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T, t = r % T;
      const int64_t n = ids ? ids[r] : t;
      const int64_t gy = n / gw, gx = n % gw;
      char* trow = tok + r * row_bytes;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t py = 0; py < p; ++py) {
          char* iseg = img + (((b * C + c) * H + gy * p + py) * W + gx * p) * E;
          char* tseg = trow + (c * p + py) * p * E;
          if (to_tokens) {
            std::memcpy(tseg, iseg, p * E);
          } else {
            std::memcpy(iseg, tseg, p * E);
          }
        }
      }
    }
  });
}

// inv[b, n] (B, n_cells) int32: the largest t with ids[b, t] == n, or -1 (ids unique: the token on
// cell n).  Out-of-range ids are skipped.  Same rule as the CUDA inverse_ids_kernel (atomicMax).
at::Tensor inverse_ids(const int64_t* ids, int64_t B, int64_t T, int64_t n_cells) {
  at::Tensor inv = at::full({B, n_cells}, -1, at::TensorOptions().dtype(at::kInt));
  int32_t* out = inv.data_ptr<int32_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t n = ids[b * T + t];
        if (n >= 0 && n < n_cells) out[b * n_cells + n] = std::max(out[b * n_cells + n], static_cast<int32_t>(t));
      }
    }
  });
  return inv;
}

// image[b, c, y, :] for every (b, c, y) from the inverse map: segment gx of p elements is token
// inv[b, gy*gw + gx]'s row (c, y % p), or zeros.  Every image element is written once.
void unpatch_from_inverse(const at::Tensor& image, const at::Tensor& tokens, const int32_t* inv, int64_t p) {
  const int64_t B = image.size(0), C = image.size(1), H = image.size(2), W = image.size(3);
  const int64_t T = tokens.size(1), gw = W / p, n_cells = (H / p) * gw;
  const int64_t E = image.element_size();
  char* img = static_cast<char*>(image.data_ptr());
  const char* tok = static_cast<const char*>(tokens.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, W * E));
  at::parallel_for(0, B * C * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {  // r = (b*C + c)*H + y
      const int64_t y = r % H, bc = r / H;
      const int64_t c = bc % C, b = bc / C;
      const int64_t gy = y / p, py = y % p;
      char* irow = img + r * W * E;
      for (int64_t gx = 0; gx < gw; ++gx) {
        const int32_t t = inv[b * n_cells + gy * gw + gx];
        char* iseg = irow + gx * p * E;
        if (t >= 0) {
          std::memcpy(iseg, tok + ((((b * T + t) * C + c) * p + py) * p) * E, p * E);
        } else {
          std::memset(iseg, 0, p * E);
        }
      }
    }
  });
}

// C*p*p (the token width) and the image size without int64 overflow (also for empty inputs).
int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(!c10::mul_overflows(a, b, &r), what, " overflows int64 (", a, " * ", b, ")");
  return r;
}

at::Tensor patchify_cpu(const at::Tensor& images_in, int64_t p, const std::optional<at::Tensor>& ids_keep) {
  RF_CHECK_CPU(images_in, "images");
  RF_CHECK_FLOAT(images_in, "images");
  TORCH_CHECK(images_in.dim() == 4, "images must have shape (B, C, H, W), got ", images_in.sizes());
  TORCH_CHECK(p > 0, "p must be positive, got ", p);
  const int64_t B = images_in.size(0), C = images_in.size(1), H = images_in.size(2), W = images_in.size(3);
  TORCH_CHECK(H % p == 0 && W % p == 0, "images spatial size (", H, ", ", W, ") must be divisible by p = ", p);
  const int64_t N = (H / p) * (W / p);
  const int64_t D = checked_mul(C, checked_mul(p, p, "p*p"), "C*p*p");
  at::Tensor ids;
  if (ids_keep.has_value()) ids = check_ids(*ids_keep, images_in, B, -1, N);
  const int64_t T = ids.defined() ? ids.size(1) : N;
  at::Tensor images = images_in.contiguous();
  at::Tensor out = at::empty({B, T, D}, images.options());
  if (out.numel() == 0) return out;
  patch_copy(images, out, ids.defined() ? ids.data_ptr<int64_t>() : nullptr, p, /*to_tokens=*/true);
  return out;
}

at::Tensor unpatchify_cpu(const at::Tensor& tokens_in, int64_t p, int64_t channels, int64_t gh, int64_t gw,
                          const std::optional<at::Tensor>& ids_keep) {
  RF_CHECK_CPU(tokens_in, "tokens");
  RF_CHECK_FLOAT(tokens_in, "tokens");
  TORCH_CHECK(tokens_in.dim() == 3, "tokens must have shape (B, T, C*p*p), got ", tokens_in.sizes());
  // channels = 0 is the backward of a patchify of a 0-channel image: empty results
  TORCH_CHECK(p > 0 && channels >= 0 && gh >= 0 && gw >= 0, "need p > 0, channels >= 0, gh >= 0, gw >= 0, got p=", p,
              " channels=", channels, " gh=", gh, " gw=", gw);
  const int64_t B = tokens_in.size(0), T = tokens_in.size(1), N = checked_mul(gh, gw, "gh*gw");
  const int64_t D = checked_mul(channels, checked_mul(p, p, "p*p"), "channels*p*p");
  const int64_t H = checked_mul(gh, p, "gh*p"), W = checked_mul(gw, p, "gw*p");
  TORCH_CHECK(tokens_in.size(2) == D, "tokens last dim must be channels*p*p = ", D, ", got ", tokens_in.size(2));
  at::Tensor ids;
  if (ids_keep.has_value()) {
    ids = check_ids(*ids_keep, tokens_in, B, T, N);
  } else {
    TORCH_CHECK(T == N, "tokens must have gh*gw = ", N, " tokens, got ", T);
  }
  at::Tensor tokens = tokens_in.contiguous();
  // every element is written exactly once, also with ids_keep (cells no token lands on get zeros)
  at::Tensor out = at::empty({B, channels, H, W}, tokens.options());
  if (out.numel() == 0) return out;
  if (ids.defined()) {
    at::Tensor inv = inverse_ids(ids.data_ptr<int64_t>(), B, T, N);
    unpatch_from_inverse(out, tokens, inv.data_ptr<int32_t>(), p);
  } else {
    patch_copy(out, tokens, nullptr, p, /*to_tokens=*/false);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rectok_fast, CPU, m) {
  m.impl("patchify", &patchify_cpu);
  m.impl("unpatchify", &unpatchify_cpu);
}

}  // namespace rectok_fast
