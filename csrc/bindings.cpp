// Op schemas of effssl_kernels. Importing effssl_kernels._C runs these registrations; the
// pybind11 module only makes the library importable and tells what was built.
#include <Python.h>
#include <torch/library.h>

#include <string>

TORCH_LIBRARY(effssl_kernels, m) {
  // SEMANTICS.md section 1. centers: int [N, Hb, Wb, 2] or None; flip: bool [N] or None.
  m.def(
      "block_match(Tensor a, Tensor b, int block_size, int search_radius, float data_range, "
      "Tensor? centers, Tensor? flip) -> (Tensor psnr, Tensor offset)");
}

// A plain CPython module (no pybind11 headers: they add ~20 s of compile time to a file that
// needs two functions).
static PyObject* with_cuda(PyObject*, PyObject*) {
#ifdef WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyObject* cuda_archs(PyObject*, PyObject*) {
#ifdef EFFSSL_CUDA_ARCHS
  return PyUnicode_FromString(EFFSSL_CUDA_ARCHS);
#else
  return PyUnicode_FromString("");
#endif
}

static PyMethodDef methods[] = {
    {"with_cuda", with_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {"cuda_archs", cuda_archs, METH_NOARGS, "TORCH_CUDA_ARCH_LIST the CUDA kernels were built for."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
