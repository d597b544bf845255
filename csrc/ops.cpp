// Schemas of every C++ op of rectok_fast (TORCH_LIBRARY(rectok_fast, m)) and the Python module
// entry point.  The module has no Python functions: importing it registers the ops.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rectok_fast, m) {
}
