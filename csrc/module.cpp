// Makes the library importable as the Python module se_kernels._C. Importing it runs the
// static TORCH_LIBRARY_IMPL registrations of the CPU (and CUDA) kernels; it exports nothing.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
