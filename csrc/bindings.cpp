// Op schemas of effssl_kernels. Importing effssl_kernels._C runs these registrations; the
// pybind11 module only makes the library importable and tells what was built.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "block_match/block_match.h"

TORCH_LIBRARY(effssl_kernels, m) {
  // SEMANTICS.md section 1. centers: int [N, Hb, Wb, 2] or None; flip: bool [N] or None.
  m.def(
      "block_match(Tensor a, Tensor b, int block_size, int search_radius, float data_range, "
      "Tensor? centers, Tensor? flip) -> (Tensor psnr, Tensor offset)");

  // --- gather_tokens (SEMANTICS.md section 3) ---
  // x [N, L, D]; keep int [N, K]; pos_embed [L, D] or [1, L, D] -> [N, K, D] (promoted dtype).
  m.def("gather_tokens(Tensor x, Tensor keep, Tensor? pos_embed) -> Tensor");
  // -> (grad_x [N, L, D] in x_dtype, grad_pos [L, D] in pos_dtype); an empty [0] tensor for a
  // gradient not asked for (a custom op cannot return None).
  m.def(
      "gather_tokens_backward(Tensor grad, Tensor keep, int num_tokens, ScalarType x_dtype, "
      "ScalarType pos_dtype, bool need_x, bool need_pos) -> (Tensor grad_x, Tensor grad_pos)");
  // --- end gather_tokens ---

  // --- patch_embed_gather (SEMANTICS.md section 3) ---
  // weight [D, C, p, p] sets the GEMM dtype (bias has it too); images are converted to it as
  // they are gathered. keep int32/int64 [N, K]; pos_embed [1, L, D] / [L, D] or None.
  m.def(
      "patch_embed_gather(Tensor images, Tensor weight, Tensor? bias, Tensor keep, "
      "Tensor? pos_embed) -> Tensor");
  // im2col of the kept patches, [N, K, C*p*p] in dtype, columns (c, ky, kx); and its adjoint
  // (duplicates summed in float32/float64), used by the backward.
  m.def("_gather_patches(Tensor images, Tensor keep, int patch_size, ScalarType dtype) -> Tensor");
  m.def(
      "_scatter_patches(Tensor cols, Tensor keep, int patch_size, int height, int width, "
      "ScalarType dtype) -> Tensor");
  // --- end patch_embed_gather ---

  // --- halo_gather (SEMANTICS.md section 2) ---
  // A gather of whole pixels (C channels each) from a source [T, C, bh, bw] whose S = T*bh*bw
  // pixels are numbered t*bh*bw + y*bw + x: table int64 [R, ph, pw] names each output pixel's
  // source, or S (zero) or S + 1 (`outside`) -> [R, C, ph, pw] channels last. With R = T it
  // gives each packed tile its halo; other tables pack a dense map (the source [N, C, H, W]) or
  // unpack tiles. order / offsets: the inverse table, which only the backward reads (inputs, so
  // that autograd can save them).
  m.def(
      "halo_gather(Tensor tiles, Tensor table, Tensor order, Tensor offsets, float outside) -> "
      "Tensor");
  // grad [R, C, ph, pw] -> grad of the source [num_tiles, C, bh, bw] channels last (num_tiles a
  // SymInt: a data-dependent tile count must not specialise a compiled backward): per source
  // pixel s, the sum over order[offsets[s]:offsets[s+1]] (output pixels r*ph*pw + u*pw + v) in a
  // fixed order.
  m.def(
      "halo_gather_backward(Tensor grad, Tensor order, Tensor offsets, SymInt num_tiles, int bh, "
      "int bw) -> Tensor");
  // --- end halo_gather ---

  // --- multi_crop (SEMANTICS.md section 4) ---
  // images [N, C, H, W]; boxes float/int [N, P, 4] (top, left, height, width); flips bool [N, P]
  // -> [N*P, C, out_h, out_w] contiguous in out_dtype (default images'). Forward only.
  m.def(
      "multi_crop(Tensor images, Tensor boxes, Tensor flips, int out_h, int out_w, "
      "ScalarType? out_dtype) -> Tensor");
  // --- end multi_crop ---

  // --- photometric (effssl_kernels/reference/photometric.py) ---
  // views [N, 3, H, W] float32/float16/bfloat16 in [0, 1] or uint8; params float32 [N, 13]
  // (brightness, contrast, saturation, hue, order[4] as 0..3, jitter, gray, blur, solarize flags
  // as 0/1, solarize threshold in [0, 1]); blur_weights float32 [N, K] (K odd; row n read only
  // where the blur flag is set); norm float32 [2, 3] (mean; std) or None -> [N, 3, H, W] in the
  // views' dtype (float32 for uint8 views with norm), channels_last iff the views are.
  m.def("photometric(Tensor views, Tensor params, Tensor blur_weights, Tensor? norm) -> Tensor");
  // --- end photometric ---
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

static PyObject* block_match_cuda_last_path(PyObject*, PyObject*) {
#ifdef WITH_CUDA
  return PyUnicode_FromString(effssl::block_match_cuda_last_path());
#else
  return PyUnicode_FromString("");
#endif
}

static PyMethodDef methods[] = {
    {"with_cuda", with_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {"cuda_archs", cuda_archs, METH_NOARGS, "TORCH_CUDA_ARCH_LIST the CUDA kernels were built for."},
    {"block_match_cuda_last_path", block_match_cuda_last_path, METH_NOARGS,
     "Which block_match CUDA kernel this thread launched last: image, tiled, direct, or ''."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
