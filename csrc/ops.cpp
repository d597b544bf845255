// Schemas of every C++ op of rectok_fast (TORCH_LIBRARY(rectok_fast, m)) and the Python module
// entry point.  The module has no Python functions: importing it registers the ops.
// CPU kernels live in *_cpu.cpp (TORCH_LIBRARY_IMPL(rectok_fast, CPU, m)), CUDA kernels in *.cu
// (TORCH_LIBRARY_IMPL(rectok_fast, CUDA, m)); fakes and autograd are registered from Python
// (rectok_fast/ops/<op>.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rectok_fast, m) {
  // (B, C, H, W) -> (B, N, C*p*p), N = (H/p)*(W/p) row-major over the grid, each token flattened in
  // (c, py, px) order.  With ids_keep (B, K) int64 (unique per row, in [0, N)) only those tokens:
  // (B, K, C*p*p).
  m.def("patchify(Tensor images, int p, Tensor? ids_keep) -> Tensor");
  // Inverse of patchify: (B, gh*gw, C*p*p) -> (B, C, gh*p, gw*p).  With ids_keep (B, K) the K
  // tokens are scattered into a zero image (the adjoint of the ids_keep patchify).
  m.def("unpatchify(Tensor tokens, int p, int channels, int gh, int gw, Tensor? ids_keep) -> Tensor");
}
