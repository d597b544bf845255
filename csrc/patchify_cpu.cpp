// CPU kernels of rectok_fast::patchify / rectok_fast::unpatchify.
//
// Both ops are pure copies, so the kernels move bytes (element size from the dtype) and are
// dtype-agnostic; the dtype is still checked against the supported set (fp32/fp64/fp16/bf16).
// Layout: image (B, C, H, W) contiguous; tokens (B, T, C, p, p) contiguous, i.e. (B, T, C*p*p).
// Token (b, t) is grid cell n = ids_keep[b, t] (or t), gy = n / gw, gx = n % gw; its (c, py) row of
// p elements is the contiguous image segment images[b, c, gy*p + py, gx*p : gx*p + p], so each
// (b, t, c, py) is one memcpy of p elements.  Rows (b, t) are split over threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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
at::Tensor check_ids(const at::Tensor& ids, int64_t B, int64_t K, int64_t n_cells) {
  RF_CHECK_CPU(ids, "ids_keep");
  TORCH_CHECK(ids.scalar_type() == at::kLong, "ids_keep must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B && (K < 0 || ids.size(1) == K), "ids_keep must have shape (", B,
              ", ", K < 0 ? "K" : std::to_string(K), "), got ", ids.sizes());
  at::Tensor c = ids.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  const int64_t k = c.size(1);
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

at::Tensor patchify_cpu(const at::Tensor& images_in, int64_t p, const std::optional<at::Tensor>& ids_keep) {
  RF_CHECK_CPU(images_in, "images");
  RF_CHECK_FLOAT(images_in, "images");
  TORCH_CHECK(images_in.dim() == 4, "images must have shape (B, C, H, W), got ", images_in.sizes());
  TORCH_CHECK(p > 0, "p must be positive, got ", p);
  const int64_t B = images_in.size(0), C = images_in.size(1), H = images_in.size(2), W = images_in.size(3);
  TORCH_CHECK(H % p == 0 && W % p == 0, "images spatial size (", H, ", ", W, ") must be divisible by p = ", p);
  const int64_t N = (H / p) * (W / p);
  at::Tensor ids;
  if (ids_keep.has_value()) ids = check_ids(*ids_keep, B, -1, N);
  const int64_t T = ids.defined() ? ids.size(1) : N;
  at::Tensor images = images_in.contiguous();
  at::Tensor out = at::empty({B, T, C * p * p}, images.options());
  if (out.numel() == 0) return out;
  patch_copy(images, out, ids.defined() ? ids.data_ptr<int64_t>() : nullptr, p, /*to_tokens=*/true);
  return out;
}

at::Tensor unpatchify_cpu(const at::Tensor& tokens_in, int64_t p, int64_t channels, int64_t gh, int64_t gw,
                          const std::optional<at::Tensor>& ids_keep) {
  RF_CHECK_CPU(tokens_in, "tokens");
  RF_CHECK_FLOAT(tokens_in, "tokens");
  TORCH_CHECK(tokens_in.dim() == 3, "tokens must have shape (B, T, C*p*p), got ", tokens_in.sizes());
  TORCH_CHECK(p > 0 && channels > 0 && gh >= 0 && gw >= 0, "need p > 0, channels > 0, gh >= 0, gw >= 0, got p=", p,
              " channels=", channels, " gh=", gh, " gw=", gw);
  const int64_t B = tokens_in.size(0), T = tokens_in.size(1), N = gh * gw;
  TORCH_CHECK(tokens_in.size(2) == channels * p * p, "tokens last dim must be channels*p*p = ", channels * p * p,
              ", got ", tokens_in.size(2));
  at::Tensor ids;
  if (ids_keep.has_value()) {
    ids = check_ids(*ids_keep, B, T, N);
  } else {
    TORCH_CHECK(T == N, "tokens must have gh*gw = ", N, " tokens, got ", T);
  }
  at::Tensor tokens = tokens_in.contiguous();
  auto opts = tokens.options();
  // With ids_keep the cells no token lands on stay zero; without, every element is written.
  at::Tensor out = ids.defined() ? at::zeros({B, channels, gh * p, gw * p}, opts)
                                 : at::empty({B, channels, gh * p, gw * p}, opts);
  if (tokens.numel() == 0) return out;
  patch_copy(out, tokens, ids.defined() ? ids.data_ptr<int64_t>() : nullptr, p, /*to_tokens=*/false);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rectok_fast, CPU, m) {
  m.impl("patchify", &patchify_cpu);
  m.impl("unpatchify", &unpatchify_cpu);
}

}  // namespace rectok_fast
