// pybind11 module prefopt_kernels._C: the kernels over raw device/host pointers. Tensors
// never cross this boundary (the module does not link libtorch, so one build works with
// every PyTorch version); the Python bridge passes data_ptr()s, the [B, T, V] view shape
// (n_rows = B * T, tokens = T, vocab = V) with batch and token strides in elements, dtype
// codes and, for CUDA, the stream handle, all as integers. A pointer of 0 means "absent"
// (optional inputs and outputs not asked for). fold, sweep and backward also take a
// vocabulary slice [v0, v0 + vocab) of the rows (vocab may be 0 there: an empty slice).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>

#include "cpu/row_kernels.h"
#include "prefopt/common.h"
#if defined(PREFOPT_WITH_CUDA)
#include "cuda/row_kernels.h"
#endif

namespace py = pybind11;
using prefopt::BackwardArgs;
using prefopt::FoldArgs;
using prefopt::ForwardArgs;
using prefopt::SweepArgs;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// The leading parameters of every entry point: the inputs shared by forward and backward.
#define PREFOPT_ROW_PARAMS                                                                 \
  int64_t n_rows, int64_t tokens, int64_t vocab, std::uintptr_t logits,                    \
      int64_t logits_batch_stride, int64_t logits_token_stride, std::uintptr_t ref,        \
      int64_t ref_batch_stride, int64_t ref_token_stride, int dtype, std::uintptr_t labels, \
      std::uintptr_t weight, double temperature, int64_t ignore_index, int divergence,      \
      double beta, double alpha
#define PREFOPT_ROW_ARGS                                                                   \
  n_rows, tokens, vocab, logits, logits_batch_stride, logits_token_stride, ref,            \
      ref_batch_stride, ref_token_stride, dtype, labels, weight, temperature, ignore_index, \
      divergence, beta, alpha
#define PREFOPT_FORWARD_PARAMS                                                             \
  PREFOPT_ROW_PARAMS, bool want_logp, bool want_ref_logp, bool want_entropy,              \
      std::uintptr_t row_max, std::uintptr_t log_norm, std::uintptr_t logp,                \
      std::uintptr_t ref_logp, std::uintptr_t entropy, std::uintptr_t div,                 \
      std::uintptr_t ref_row_max, std::uintptr_t ref_log_norm, std::uintptr_t div_s,      \
      std::uintptr_t ref_at_argmax
#define PREFOPT_FORWARD_ARGS                                                               \
  PREFOPT_ROW_ARGS, want_logp, want_ref_logp, want_entropy, row_max, log_norm, logp,      \
      ref_logp, entropy, div, ref_row_max, ref_log_norm, div_s, ref_at_argmax
#define PREFOPT_BACKWARD_PARAMS                                                            \
  PREFOPT_ROW_PARAMS, std::uintptr_t row_max, std::uintptr_t log_norm,                    \
      std::uintptr_t ref_row_max, std::uintptr_t ref_log_norm, std::uintptr_t entropy,     \
      std::uintptr_t div_s, std::uintptr_t ref_at_argmax, std::uintptr_t grad_logp,       \
      std::uintptr_t grad_entropy, std::uintptr_t grad_div, std::uintptr_t grad,           \
      int64_t grad_batch_stride, int64_t grad_token_stride, int64_t v0
#define PREFOPT_BACKWARD_ARGS                                                              \
  PREFOPT_ROW_ARGS, row_max, log_norm, ref_row_max, ref_log_norm, entropy, div_s,         \
      ref_at_argmax, grad_logp, grad_entropy, grad_div, grad, grad_batch_stride,          \
      grad_token_stride, v0
#define PREFOPT_FOLD_PARAMS                                                                \
  PREFOPT_ROW_PARAMS, int64_t v0, std::uintptr_t max, std::uintptr_t sum_exp,             \
      std::uintptr_t ent_acc, std::uintptr_t argmax, std::uintptr_t label_logit,           \
      std::uintptr_t ref_max, std::uintptr_t ref_sum_exp, std::uintptr_t ref_label_logit,  \
      std::uintptr_t ref_at_argmax, std::uintptr_t fkl_acc, std::uintptr_t rkl_acc
#define PREFOPT_FOLD_ARGS                                                                  \
  PREFOPT_ROW_ARGS, v0, max, sum_exp, ent_acc, argmax, label_logit, ref_max, ref_sum_exp, \
      ref_label_logit, ref_at_argmax, fkl_acc, rkl_acc
#define PREFOPT_SWEEP_PARAMS                                                               \
  PREFOPT_ROW_PARAMS, std::uintptr_t row_max, std::uintptr_t log_norm,                    \
      std::uintptr_t ref_row_max, std::uintptr_t ref_log_norm, std::uintptr_t ref_at_argmax, \
      std::uintptr_t value_sum, std::uintptr_t centred_sum
#define PREFOPT_SWEEP_ARGS                                                                 \
  PREFOPT_ROW_ARGS, row_max, log_norm, ref_row_max, ref_log_norm, ref_at_argmax, value_sum, \
      centred_sum

// Whether a call reads any element: an empty slice (vocab 0) is legal for fold, sweep and
// backward, and its views may have null data pointers.
bool reads(int64_t n_rows, int64_t vocab) { return n_rows > 0 && vocab > 0; }

// Validates and fills the inputs shared by every entry point.
prefopt::RowInputs row_inputs(PREFOPT_ROW_PARAMS, int num_threads) {
  if (n_rows < 0 || vocab < 0 || (n_rows > 0 && (tokens <= 0 || n_rows % tokens != 0)))
    throw std::invalid_argument("prefopt._C: bad shape");
  if (logits == 0 && reads(n_rows, vocab))
    throw std::invalid_argument("prefopt._C: logits required");
  // Unknown codes are refused here, before any work, by the kernels' own dispatch.
  PREFOPT_DISPATCH_DTYPE(dtype, DT, (void)DT);
  PREFOPT_DISPATCH_DIVERGENCE(divergence, DIV, (void)DIV);
  if (!(temperature > 0.0)) throw std::invalid_argument("prefopt._C: temperature must be > 0");
  prefopt::RowInputs a;
  a.n_rows = n_rows;
  a.tokens = tokens;
  a.vocab = vocab;
  a.logits = ptr<const void>(logits);
  a.logits_batch_stride = logits_batch_stride;
  a.logits_token_stride = logits_token_stride;
  a.ref = ptr<const void>(ref);
  a.ref_batch_stride = ref_batch_stride;
  a.ref_token_stride = ref_token_stride;
  a.dtype = dtype;
  a.labels = ptr<const int64_t>(labels);
  a.weight = ptr<const float>(weight);
  a.temperature = temperature;
  a.ignore_index = ignore_index;
  a.divergence = divergence;
  a.beta = beta;
  a.alpha = alpha;
  a.num_threads = num_threads;
  return a;
}

ForwardArgs forward_args(PREFOPT_FORWARD_PARAMS, int num_threads) {
  ForwardArgs a;
  static_cast<prefopt::RowInputs&>(a) = row_inputs(PREFOPT_ROW_ARGS, num_threads);
  if (vocab == 0) throw std::invalid_argument("prefopt._C: bad shape (forward needs vocab > 0)");
  if (row_max == 0 || log_norm == 0)
    throw std::invalid_argument("prefopt._C: row_max and log_norm required");
  if (ref != 0 && (ref_row_max == 0 || ref_log_norm == 0))
    throw std::invalid_argument("prefopt._C: a reference needs ref_row_max and ref_log_norm");
  if (divergence != 0 && (ref == 0 || div == 0 || div_s == 0))
    throw std::invalid_argument("prefopt._C: a divergence needs ref, div and div_s");
  if (divergence > prefopt::kForwardKL && ref_at_argmax == 0)
    throw std::invalid_argument("prefopt._C: this divergence needs ref_at_argmax");
  if ((want_logp || want_ref_logp) && labels == 0)
    throw std::invalid_argument("prefopt._C: label log-probs need labels");
  a.want_logp = want_logp;
  a.want_ref_logp = want_ref_logp && ref != 0;
  a.want_entropy = want_entropy;
  a.row_max = ptr<float>(row_max);
  a.log_norm = ptr<float>(log_norm);
  a.logp = ptr<float>(logp);
  a.ref_logp = ptr<float>(ref_logp);
  a.entropy = ptr<float>(entropy);
  a.div = ptr<float>(div);
  a.ref_row_max = ptr<float>(ref_row_max);
  a.ref_log_norm = ptr<float>(ref_log_norm);
  a.div_s = ptr<float>(div_s);
  a.ref_at_argmax = ptr<float>(ref_at_argmax);
  return a;
}

BackwardArgs backward_args(PREFOPT_BACKWARD_PARAMS, int num_threads) {
  BackwardArgs a;
  static_cast<prefopt::RowInputs&>(a) = row_inputs(PREFOPT_ROW_ARGS, num_threads);
  if (row_max == 0 || log_norm == 0 || (grad == 0 && reads(n_rows, vocab)))
    throw std::invalid_argument("prefopt._C: row_max, log_norm and grad required");
  if (v0 < 0) throw std::invalid_argument("prefopt._C: v0 must be >= 0");
  if (grad_entropy != 0 && entropy == 0)
    throw std::invalid_argument("prefopt._C: an entropy gradient needs the saved entropy");
  if (grad_div != 0 && divergence != 0 &&
      ((ref == 0 && reads(n_rows, vocab)) || ref_row_max == 0 || ref_log_norm == 0 || div_s == 0 ||
       (divergence > prefopt::kForwardKL && ref_at_argmax == 0)))
    throw std::invalid_argument(
        "prefopt._C: a divergence gradient needs ref, ref_row_max, ref_log_norm, div_s and "
        "(past forward KL) ref_at_argmax");
  a.row_max = ptr<const float>(row_max);
  a.log_norm = ptr<const float>(log_norm);
  a.ref_row_max = ptr<const float>(ref_row_max);
  a.ref_log_norm = ptr<const float>(ref_log_norm);
  a.entropy = ptr<const float>(entropy);
  a.div_s = ptr<const float>(div_s);
  a.ref_at_argmax = ptr<const float>(ref_at_argmax);
  a.grad_logp = ptr<const float>(grad_logp);
  a.grad_entropy = ptr<const float>(grad_entropy);
  a.grad_div = ptr<const float>(grad_div);
  a.grad = ptr<void>(grad);
  a.grad_batch_stride = grad_batch_stride;
  a.grad_token_stride = grad_token_stride;
  a.v0 = v0;
  return a;
}

FoldArgs fold_args(PREFOPT_FOLD_PARAMS, int num_threads) {
  FoldArgs a;
  static_cast<prefopt::RowInputs&>(a) = row_inputs(PREFOPT_ROW_ARGS, num_threads);
  if (max == 0 || sum_exp == 0 || argmax == 0 || label_logit == 0)
    throw std::invalid_argument("prefopt._C: max, sum_exp, argmax and label_logit required");
  if (ref == 0 && reads(n_rows, vocab) && (ref_max != 0 || ref_sum_exp != 0 || ref_label_logit != 0 ||
                   ref_at_argmax != 0 || fkl_acc != 0 || rkl_acc != 0))
    throw std::invalid_argument("prefopt._C: the reference fields need ref");
  if ((fkl_acc != 0 && divergence != prefopt::kForwardKL) ||
      (rkl_acc != 0 && divergence != prefopt::kReverseKL))
    throw std::invalid_argument("prefopt._C: fkl_acc / rkl_acc need forward / reverse KL");
  if (v0 < 0) throw std::invalid_argument("prefopt._C: v0 must be >= 0");
  a.v0 = v0;
  a.max = ptr<float>(max);
  a.sum_exp = ptr<float>(sum_exp);
  a.ent_acc = ptr<float>(ent_acc);
  a.argmax = ptr<int64_t>(argmax);
  a.label_logit = ptr<float>(label_logit);
  a.ref_max = ptr<float>(ref_max);
  a.ref_sum_exp = ptr<float>(ref_sum_exp);
  a.ref_label_logit = ptr<float>(ref_label_logit);
  a.ref_at_argmax = ptr<float>(ref_at_argmax);
  a.fkl_acc = ptr<float>(fkl_acc);
  a.rkl_acc = ptr<float>(rkl_acc);
  return a;
}

SweepArgs sweep_args(PREFOPT_SWEEP_PARAMS, int num_threads) {
  SweepArgs a;
  static_cast<prefopt::RowInputs&>(a) = row_inputs(PREFOPT_ROW_ARGS, num_threads);
  if (divergence < prefopt::kJS)
    throw std::invalid_argument("prefopt._C: sweep is for js, tv, hellinger, chi2 and alpha");
  if ((ref == 0 && reads(n_rows, vocab)) || row_max == 0 || log_norm == 0 ||
      ref_row_max == 0 || ref_log_norm == 0 || ref_at_argmax == 0 || value_sum == 0 ||
      centred_sum == 0)
    throw std::invalid_argument(
        "prefopt._C: sweep needs ref, row_max, log_norm, ref_row_max, ref_log_norm, "
        "ref_at_argmax, value_sum and centred_sum");
  a.row_max = ptr<const float>(row_max);
  a.log_norm = ptr<const float>(log_norm);
  a.ref_row_max = ptr<const float>(ref_row_max);
  a.ref_log_norm = ptr<const float>(ref_log_norm);
  a.ref_at_argmax = ptr<const float>(ref_at_argmax);
  a.value_sum = ptr<float>(value_sum);
  a.centred_sum = ptr<float>(centred_sum);
  return a;
}

void cpu_forward(PREFOPT_FORWARD_PARAMS, int num_threads) {
  const ForwardArgs a = forward_args(PREFOPT_FORWARD_ARGS, num_threads);
  py::gil_scoped_release nogil;
  prefopt::cpu::forward(a);
}

void cpu_backward(PREFOPT_BACKWARD_PARAMS, int num_threads) {
  const BackwardArgs a = backward_args(PREFOPT_BACKWARD_ARGS, num_threads);
  py::gil_scoped_release nogil;
  prefopt::cpu::backward(a);
}

void cpu_fold(PREFOPT_FOLD_PARAMS, int num_threads) {
  const FoldArgs a = fold_args(PREFOPT_FOLD_ARGS, num_threads);
  py::gil_scoped_release nogil;
  prefopt::cpu::fold(a);
}

void cpu_sweep(PREFOPT_SWEEP_PARAMS, int num_threads) {
  const SweepArgs a = sweep_args(PREFOPT_SWEEP_ARGS, num_threads);
  py::gil_scoped_release nogil;
  prefopt::cpu::sweep(a);
}

void cuda_forward(PREFOPT_FORWARD_PARAMS, std::uintptr_t stream) {
#if defined(PREFOPT_WITH_CUDA)
  const ForwardArgs a = forward_args(PREFOPT_FORWARD_ARGS, 0);
  const char* err;
  {
    py::gil_scoped_release nogil;
    err = prefopt::cuda::forward(a, ptr<void>(stream));
  }
  if (err != nullptr) throw std::runtime_error(std::string("prefopt._C cuda_forward: ") + err);
#else
  (void)stream;
  throw std::runtime_error("prefopt_kernels._C was built without CUDA");
#endif
}

void cuda_backward(PREFOPT_BACKWARD_PARAMS, std::uintptr_t stream) {
#if defined(PREFOPT_WITH_CUDA)
  const BackwardArgs a = backward_args(PREFOPT_BACKWARD_ARGS, 0);
  const char* err;
  {
    py::gil_scoped_release nogil;
    err = prefopt::cuda::backward(a, ptr<void>(stream));
  }
  if (err != nullptr) throw std::runtime_error(std::string("prefopt._C cuda_backward: ") + err);
#else
  (void)stream;
  throw std::runtime_error("prefopt_kernels._C was built without CUDA");
#endif
}

void cuda_fold(PREFOPT_FOLD_PARAMS, std::uintptr_t stream) {
#if defined(PREFOPT_WITH_CUDA)
  const FoldArgs a = fold_args(PREFOPT_FOLD_ARGS, 0);
  const char* err;
  {
    py::gil_scoped_release nogil;
    err = prefopt::cuda::fold(a, ptr<void>(stream));
  }
  if (err != nullptr) throw std::runtime_error(std::string("prefopt._C cuda_fold: ") + err);
#else
  (void)stream;
  throw std::runtime_error("prefopt_kernels._C was built without CUDA");
#endif
}

void cuda_sweep(PREFOPT_SWEEP_PARAMS, std::uintptr_t stream) {
#if defined(PREFOPT_WITH_CUDA)
  const SweepArgs a = sweep_args(PREFOPT_SWEEP_ARGS, 0);
  const char* err;
  {
    py::gil_scoped_release nogil;
    err = prefopt::cuda::sweep(a, ptr<void>(stream));
  }
  if (err != nullptr) throw std::runtime_error(std::string("prefopt._C cuda_sweep: ") + err);
#else
  (void)stream;
  throw std::runtime_error("prefopt_kernels._C was built without CUDA");
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "Native row kernels of prefopt_kernels (C++/OpenMP CPU and optional CUDA). Functions take "
      "raw pointers as ints, the [B, T, V] view as n_rows = B * T, tokens = T, vocab = V with "
      "batch and token strides in elements, and dtype codes "
      "(0 fp32, 1 bf16, 2 fp16); pointer 0 means absent.";
  const auto row_names = [] {
    return std::make_tuple(
        py::arg("n_rows"), py::arg("tokens"), py::arg("vocab"), py::arg("logits"),
        py::arg("logits_batch_stride"), py::arg("logits_token_stride"), py::arg("ref"),
        py::arg("ref_batch_stride"), py::arg("ref_token_stride"), py::arg("dtype"), py::arg("labels"),
        py::arg("weight"), py::arg("temperature"), py::arg("ignore_index"),
        py::arg("divergence"), py::arg("beta"), py::arg("alpha"));
  };
  const auto fold_names = [&](auto&& extra) {
    return std::tuple_cat(
        row_names(),
        std::make_tuple(py::arg("v0"), py::arg("max"), py::arg("sum_exp"), py::arg("ent_acc"),
                        py::arg("argmax"), py::arg("label_logit"), py::arg("ref_max"),
                        py::arg("ref_sum_exp"), py::arg("ref_label_logit"),
                        py::arg("ref_at_argmax"), py::arg("fkl_acc"), py::arg("rkl_acc"), extra));
  };
  const auto sweep_names = [&](auto&& extra) {
    return std::tuple_cat(
        row_names(),
        std::make_tuple(py::arg("row_max"), py::arg("log_norm"), py::arg("ref_row_max"),
                        py::arg("ref_log_norm"), py::arg("ref_at_argmax"), py::arg("value_sum"),
                        py::arg("centred_sum"), extra));
  };
  const auto fwd_names = [&](auto&& extra) {
    return std::tuple_cat(
        row_names(),
        std::make_tuple(py::arg("want_logp"), py::arg("want_ref_logp"), py::arg("want_entropy"),
                        py::arg("row_max"), py::arg("log_norm"), py::arg("logp"),
                        py::arg("ref_logp"), py::arg("entropy"), py::arg("div"),
                        py::arg("ref_row_max"), py::arg("ref_log_norm"), py::arg("div_s"),
                        py::arg("ref_at_argmax"), extra));
  };
  const auto bwd_names = [&](auto&& extra) {
    return std::tuple_cat(
        row_names(),
        std::make_tuple(py::arg("row_max"), py::arg("log_norm"), py::arg("ref_row_max"),
                        py::arg("ref_log_norm"), py::arg("entropy"), py::arg("div_s"),
                        py::arg("ref_at_argmax"), py::arg("grad_logp"), py::arg("grad_entropy"),
                        py::arg("grad_div"), py::arg("grad"), py::arg("grad_batch_stride"),
                        py::arg("grad_token_stride"), py::arg("v0"), extra));
  };
  const auto def = [&m](const char* name, auto fn, auto names, const char* doc) {
    std::apply([&](auto&&... a) { m.def(name, fn, a..., doc); }, names);
  };
  def("cpu_forward", &cpu_forward, fwd_names(py::arg("num_threads") = 0),
      "Per-row statistics of the fused token ops on CPU tensors; writes the fp32 [n_rows] "
      "outputs whose pointers are non-zero (row_max and log_norm always).");
  def("cpu_backward", &cpu_backward, bwd_names(py::arg("num_threads") = 0),
      "Gradient wrt logits on CPU, written into grad ([n_rows, vocab] in the logits dtype, "
      "may alias logits); the rows' vocabulary slice [v0, v0 + vocab) with global labels.");
  def("cpu_fold", &cpu_fold, fold_names(py::arg("num_threads") = 0),
      "First pass over the vocabulary slice [v0, v0 + vocab) of CPU rows: writes the slice's "
      "row state (fp32 [n_rows], argmax int64 global) into the non-zero output pointers.");
  def("cpu_sweep", &cpu_sweep, sweep_names(py::arg("num_threads") = 0),
      "Second sweep of js/tv/hellinger/chi2/alpha over a vocabulary slice of CPU rows from the "
      "final statistics: fp32 [n_rows] value_sum and centred_sum.");
  def("cuda_forward", &cuda_forward, fwd_names(py::arg("stream")),
      "As cpu_forward, for CUDA device pointers, enqueued on the given cudaStream_t handle.");
  def("cuda_backward", &cuda_backward, bwd_names(py::arg("stream")),
      "As cpu_backward, for CUDA device pointers, enqueued on the given cudaStream_t handle.");
  def("cuda_fold", &cuda_fold, fold_names(py::arg("stream")),
      "As cpu_fold, for CUDA device pointers, enqueued on the given cudaStream_t handle.");
  def("cuda_sweep", &cuda_sweep, sweep_names(py::arg("stream")),
      "As cpu_sweep, for CUDA device pointers, enqueued on the given cudaStream_t handle.");
  m.def("has_cuda", []() {
#if defined(PREFOPT_WITH_CUDA)
    return true;
#else
    return false;
#endif
  }, "True when the module was compiled with the CUDA kernels.");
  m.def("cpu_isa", &prefopt::cpu::isa_name,
        "Instruction-set variant of the CPU kernels chosen on this machine.");
}
