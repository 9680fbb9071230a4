// Every lowrank C++ op schema, defined once. Kernels register per device in csrc/cpu/ and csrc/cuda/;
// fake (meta) implementations and autograd live in the Python module named by set_python_module.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(lowrank, m) {
  // y = x·weightᵀ + bias + scaling·(x·lora_aᵀ)·lora_bᵀ
  m.set_python_module("lowrank.ops.lora_linear");
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling) -> Tensor");
  // Gradients of lora_linear w.r.t. (x, weight, lora_a, lora_b); an entry is undefined (None) where
  // output_mask is false. The bias gradient is a plain reduction done by the caller.
  m.def(
      "lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scaling, "
      "bool[4] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?)");
  // The same forward run by the Triton kernel (lowrank/kernels/triton/lora_linear.py registers its CPU
  // (interpreter) and CUDA implementations when triton is importable). Backward: lora_linear_backward.
  m.def("lora_linear_triton(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling) -> Tensor");
  // logits[t, j] = hidden[t]·weight[ids[j]] + bias[ids[j]]: k rows of an LM head instead of all V.
  // hidden [T, d], weight [V, d], ids [k] int32/int64, bias [V]; the Triton kernel implements the _triton twin.
  m.set_python_module("lowrank.ops.gather_logits");
  m.def("gather_logits(Tensor hidden, Tensor weight, Tensor ids, Tensor? bias) -> Tensor");
  m.def("gather_logits_triton(Tensor hidden, Tensor weight, Tensor ids, Tensor? bias) -> Tensor");
  // y = x·weightᵀ + bias in float32 on oneDNN's fp32 GEMM (CPU only): the GEMM F.linear does not take. x [..., in],
  // weight [out, in], bias [out]. Autograd (plain ATen products) in the Python module.
  m.set_python_module("lowrank.ops.onednn_linear");
  m.def("onednn_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // mass[b, h, j] = Σ_i softmax_j(scale·q[b,h,i]·k[b,h/g,j]) over j <= offset + i: column sums of the query rows
  // of causal attention, q [B, Hq, nq, d], k [B, Hkv, n, d]; float32 (float64 for double). Not differentiable.
  m.set_python_module("lowrank.ops.query_attention_mass");
  m.def("query_attention_mass(Tensor q, Tensor k, float scale, int offset) -> Tensor");
  m.def("query_attention_mass_triton(Tensor q, Tensor k, float scale, int offset) -> Tensor");
  // Multi-adapter LoRA (SGMV / BGMV): y_t = x_t·weightᵀ + bias + scaling[a]·(x_t·lora_a[a]ᵀ)·lora_b[a]ᵀ with
  // a the adapter of token t, using its first ranks[a] ranks. x [..., in], lora_a [n, r, in], lora_b [n, out, r],
  // scaling [n] float; the tokens come grouped by adapter (lowrank.ops.AdapterSegments): perm [T] int64, adapter
  // a's tokens are perm[offsets[a] : offsets[a + 1]] (offsets [n + 1] int64), tokens without one perm[offsets[n] :].
  m.set_python_module("lowrank.ops.multi_lora_linear");
  m.def(
      "multi_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor scaling, "
      "Tensor perm, Tensor offsets, Tensor? ranks) -> Tensor");
  // Gradients w.r.t. (x, weight, lora_a, lora_b) under output_mask; adapters without tokens get zeros.
  m.def(
      "multi_lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
      "Tensor scaling, Tensor perm, Tensor offsets, Tensor? ranks, bool[4] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?)");
  // The same forward run by the Triton kernel (lowrank/kernels/triton/multi_lora_linear.py registers its CPU
  // (interpreter) and CUDA implementations when triton is importable). Backward: multi_lora_linear_backward.
  m.def(
      "multi_lora_linear_triton(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "Tensor scaling, Tensor perm, Tensor offsets, Tensor? ranks) -> Tensor");
  // y = x·Aᵀ·Bᵀ + x·Sᵀ + bias, W = B·A + S never formed. x [..., in], lora_a [r, in], lora_b [out, r],
  // s_values [nnz] in CSR order; the support (built once by lowrank.ops.SparseLayout): CSR row_ptr [out + 1]
  // int32, col_idx [nnz] (uint16 on CPU where in <= 65536, else int32), and, on CUDA, its CSC transpose col_ptr
  // [in + 1], row_idx [nnz], perm [nnz] (int32; CSC entry k is CSR entry perm[k]; read by the CUDA backward, None
  // elsewhere). The _triton twin runs the sparse product in a Triton kernel.
  m.set_python_module("lowrank.ops.sparse_lowrank_linear");
  m.def(
      "sparse_lowrank_linear(Tensor x, Tensor lora_a, Tensor lora_b, Tensor s_values, Tensor row_ptr, "
      "Tensor col_idx, Tensor? col_ptr, Tensor? row_idx, Tensor? perm, Tensor? bias) -> Tensor");
  // (dx, d lora_a, d lora_b, d s_values) under output_mask (undefined where false); d s_values is the sampled
  // product g·ᵀx at the support only. The bias gradient is a row sum done by the caller.
  m.def(
      "sparse_lowrank_linear_backward(Tensor grad_out, Tensor x, Tensor lora_a, Tensor lora_b, Tensor s_values, "
      "Tensor row_ptr, Tensor col_idx, Tensor? col_ptr, Tensor? row_idx, Tensor? perm, bool[4] output_mask) -> "
      "(Tensor?, Tensor?, Tensor?, Tensor?)");
  m.def(
      "sparse_lowrank_linear_triton(Tensor x, Tensor lora_a, Tensor lora_b, Tensor s_values, Tensor row_ptr, "
      "Tensor col_idx, Tensor? col_ptr, Tensor? row_idx, Tensor? perm, Tensor? bias) -> Tensor");
  // Mixture of rank-1 experts LoRA: y = x·Wᵀ + b + s·Σ_{e ∈ topk(t)} g_te·(a_e·x_t)·b_e, lora_a [E, in],
  // lora_b [out, E], router [E, in] and router_bias [E] for gate "router", none for "self". Returns (y, indices
  // [..., k] int64, gates [..., k] fp32 (fp64 for fp64), act): act = x·[A; R]ᵀ [T, E or 2E] in the gate dtype is
  // kept for the backward (the Python wrapper does not return it).
  m.set_python_module("lowrank.ops.rank1_experts_lora");
  m.def(
      "rank1_experts_lora(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor? router, "
      "Tensor? router_bias, int top_k, float scaling, str gate, float temperature, float? threshold) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients w.r.t. (x, weight, lora_a, lora_b, router) under output_mask (None where false, and for router
  // under gate "self"); grad_gates is the gradient of the returned gates (or None). Bias gradient: a row sum.
  m.def(
      "rank1_experts_lora_backward(Tensor grad_y, Tensor? grad_gates, Tensor x, Tensor weight, Tensor lora_a, "
      "Tensor lora_b, Tensor? router, Tensor indices, Tensor act, float scaling, str gate, float temperature, "
      "float? threshold, bool[5] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
  // The same forward run by the Triton kernels (lowrank/kernels/triton/rank1_experts_lora.py registers its CPU
  // (interpreter) and CUDA implementations when triton is importable). Backward: rank1_experts_lora_backward.
  m.def(
      "rank1_experts_lora_triton(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "Tensor? router, Tensor? router_bias, int top_k, float scaling, str gate, float temperature, "
      "float? threshold) -> (Tensor, Tensor, Tensor, Tensor)");
  // fp32 y = x·weightᵀ + bias on bf16 hardware: x and weight split into bf16 halves v = v_hi + v_lo and
  // y = x_hi·W_hiᵀ + x_hi·W_loᵀ + x_lo·W_hiᵀ accumulated in fp32 ("bf16x3"). x [T, in], weight [out, in] fp32;
  // packed = bf16x3_pack(weight) ([⌈out/16⌉, ⌈in/32⌉, 2, 16, 32] bf16 B tiles of W_hi, W_lo) or None to pack
  // inside the call. The _triton twin splits in the kernel and takes no packed weight.
  m.set_python_module("lowrank.ops.bf16x3_linear");
  // activation: "none", "gelu" (erf form, applied to the fp32 result in the kernel's epilogue) or "swiglu"
  // (weight = [gate; up] [2H, in], bias [2H]: y = silu(x·gateᵀ + b_g) · (x·upᵀ + b_u), [T, H]; packed with gated).
  m.def("bf16x3_pack(Tensor weight, bool gated=False) -> Tensor");
  m.def("bf16x3_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? packed, str activation) -> Tensor");
  m.def("bf16x3_linear_triton(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor");
}

// A module init so that `import lowrank._C` loads the library (and runs the registrations above) without
// binding any Python functions: the ops are reached through torch.ops.lowrank.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
