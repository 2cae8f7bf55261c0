// pybind11 module prefopt_kernels._C: the kernels over raw device/host pointers. Tensors
// never cross this boundary (the module does not link libtorch, so one build works with
// every PyTorch version); the Python bridge passes data_ptr()s, the [B, T, V] view shape
// (n_rows = B * T, tokens = T, vocab = V) with batch and token strides in elements, dtype
// codes and, for CUDA, the stream handle, all as integers. A pointer of 0 means "absent"
// (optional inputs and outputs not asked for). fold, sweep and backward also take a
// vocabulary slice [v0, v0 + vocab) of the rows (vocab may be 0 there: an empty slice);
// finalize and finish_sweep read no logits, only n_rows and the rows' rules.
// Every entry point's keyword parameters are the fields of its argument struct, expanded
// from the lists of prefopt/args.h.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cpu/row_kernels.h"
#include "prefopt/args.h"
#if defined(PREFOPT_WITH_CUDA)
#include "cuda/row_kernels.h"
#endif

namespace py = pybind11;
using prefopt::BackwardArgs;
using prefopt::FinalizeArgs;
using prefopt::FinishSweepArgs;
using prefopt::FoldArgs;
using prefopt::ForwardArgs;
using prefopt::KeptTokensArgs;
using prefopt::RowInputs;
using prefopt::SweepArgs;

namespace {

// A field crosses from Python as itself, or as an integer address when it is a pointer.
template <typename T>
using wire_t = std::conditional_t<std::is_pointer_v<T>, std::uintptr_t, T>;

template <typename T>
T from_wire(wire_t<T> value) {
  if constexpr (std::is_pointer_v<T>) {
    return reinterpret_cast<T>(value);
  } else {
    return value;
  }
}

// Whether a call reads any element: an empty slice (vocab 0) is legal for fold, sweep and
// backward, and its views may have null data pointers.
bool reads(const RowInputs& a) { return a.n_rows > 0 && a.vocab > 0; }

// The checks every entry point shares.
void validate_rows(const RowInputs& a) {
  if (a.n_rows < 0 || a.vocab < 0 || (a.n_rows > 0 && (a.tokens <= 0 || a.n_rows % a.tokens != 0)))
    throw std::invalid_argument("prefopt._C: bad shape");
  if (a.logits == nullptr && reads(a)) throw std::invalid_argument("prefopt._C: logits required");
  // Unknown codes are refused here, before any work, by the kernels' own dispatch.
  PREFOPT_DISPATCH_DTYPE(a.dtype, DT, (void)DT);
  PREFOPT_DISPATCH_DIVERGENCE(a.divergence, DIV, (void)DIV);
  if (!(a.temperature > 0.0)) throw std::invalid_argument("prefopt._C: temperature must be > 0");
}

// The candidates a forward or a fold gathers: a count within the stack buffer, and somewhere to put them.
void validate_candidates(int64_t candidates, const float* values) {
  if (candidates < 0 || candidates > prefopt::kMaxCandidates || (candidates > 0 && values == nullptr))
    throw std::invalid_argument(
        "prefopt._C: candidates must be in [0, MAX_CANDIDATES], with candidate_values");
}

void validate(const ForwardArgs& a) {
  validate_rows(a);
  if (a.vocab == 0) throw std::invalid_argument("prefopt._C: bad shape (forward needs vocab > 0)");
  if (a.row_max == nullptr || a.log_norm == nullptr)
    throw std::invalid_argument("prefopt._C: row_max and log_norm required");
  if (a.ref != nullptr && (a.ref_row_max == nullptr || a.ref_log_norm == nullptr))
    throw std::invalid_argument("prefopt._C: a reference needs ref_row_max and ref_log_norm");
  if (a.divergence != prefopt::kNoDivergence &&
      (a.ref == nullptr || a.div == nullptr || a.div_s == nullptr))
    throw std::invalid_argument("prefopt._C: a divergence needs ref, div and div_s");
  if (prefopt::is_centred(a.divergence) && a.ref_at_argmax == nullptr)
    throw std::invalid_argument("prefopt._C: this divergence needs ref_at_argmax");
  if ((a.want_logp || a.want_ref_logp) && a.labels == nullptr)
    throw std::invalid_argument("prefopt._C: label log-probs need labels");
  validate_candidates(a.candidates, a.candidate_values);
}

void validate(const BackwardArgs& a) {
  validate_rows(a);
  if (a.row_max == nullptr || a.log_norm == nullptr || (a.grad == nullptr && reads(a)))
    throw std::invalid_argument("prefopt._C: row_max, log_norm and grad required");
  if (a.v0 < 0) throw std::invalid_argument("prefopt._C: v0 must be >= 0");
  if (a.grad_entropy != nullptr && a.entropy == nullptr)
    throw std::invalid_argument("prefopt._C: an entropy gradient needs the saved entropy");
  if (a.grad_div != nullptr && a.divergence != prefopt::kNoDivergence &&
      ((a.ref == nullptr && reads(a)) || a.ref_row_max == nullptr || a.ref_log_norm == nullptr ||
       a.div_s == nullptr || (prefopt::is_centred(a.divergence) && a.ref_at_argmax == nullptr)))
    throw std::invalid_argument(
        "prefopt._C: a divergence gradient needs ref, ref_row_max, ref_log_norm, div_s and "
        "(for a centred divergence) ref_at_argmax");
}

void validate(const FoldArgs& a) {
  validate_rows(a);
  if (a.max == nullptr || a.sum_exp == nullptr || a.argmax == nullptr || a.label_logit == nullptr)
    throw std::invalid_argument("prefopt._C: max, sum_exp, argmax and label_logit required");
  if (a.ref == nullptr && reads(a) &&
      (a.ref_max != nullptr || a.ref_sum_exp != nullptr || a.ref_label_logit != nullptr ||
       a.ref_at_argmax != nullptr || a.fkl_acc != nullptr || a.rkl_acc != nullptr))
    throw std::invalid_argument("prefopt._C: the reference fields need ref");
  if ((a.fkl_acc != nullptr && a.divergence != prefopt::kForwardKL) ||
      (a.rkl_acc != nullptr && a.divergence != prefopt::kReverseKL))
    throw std::invalid_argument("prefopt._C: fkl_acc / rkl_acc need forward / reverse KL");
  if (a.v0 < 0) throw std::invalid_argument("prefopt._C: v0 must be >= 0");
  validate_candidates(a.candidates, a.candidate_values);
}

void validate(const SweepArgs& a) {
  validate_rows(a);
  if (!prefopt::needs_second_sweep(a.divergence))
    throw std::invalid_argument("prefopt._C: sweep is for js, tv, hellinger, chi2 and alpha");
  if ((a.ref == nullptr && reads(a)) || a.row_max == nullptr || a.log_norm == nullptr ||
      a.ref_row_max == nullptr || a.ref_log_norm == nullptr || a.ref_at_argmax == nullptr ||
      a.value_sum == nullptr || a.centred_sum == nullptr)
    throw std::invalid_argument(
        "prefopt._C: sweep needs ref, row_max, log_norm, ref_row_max, ref_log_norm, "
        "ref_at_argmax, value_sum and centred_sum");
}

void validate(const KeptTokensArgs& a) {
  if (a.n_tokens < 0) throw std::invalid_argument("prefopt._C: n_tokens must be >= 0");
  if (a.summary == nullptr || (a.n_tokens > 0 && a.index == nullptr))
    throw std::invalid_argument("prefopt._C: kept_tokens needs index and summary");
}

// The checks of the entry points that finish a row state (no logits are read).
void validate_finish(const RowInputs& a) {
  if (a.n_rows < 0) throw std::invalid_argument("prefopt._C: bad shape (n_rows < 0)");
  PREFOPT_DISPATCH_DIVERGENCE(a.divergence, DIV, (void)DIV);
  if (!(a.temperature > 0.0)) throw std::invalid_argument("prefopt._C: temperature must be > 0");
}

void validate(const FinalizeArgs& a) {
  validate_finish(a);
  if (a.n_rows == 0) return;  // nothing is read or written; empty tensors may have null pointers
  if (a.max == nullptr || a.sum_exp == nullptr || a.row_max == nullptr || a.log_norm == nullptr)
    throw std::invalid_argument("prefopt._C: finalize needs max, sum_exp, row_max and log_norm");
  if (a.ref_max != nullptr && (a.ref_sum_exp == nullptr || a.ref_row_max == nullptr || a.ref_log_norm == nullptr))
    throw std::invalid_argument("prefopt._C: a reference needs ref_sum_exp, ref_row_max and ref_log_norm");
  if ((a.logp != nullptr && (a.labels == nullptr || a.label_logit == nullptr)) ||
      (a.ref_logp != nullptr && (a.labels == nullptr || a.ref_max == nullptr || a.ref_label_logit == nullptr)))
    throw std::invalid_argument("prefopt._C: label log-probs need labels and the label logits");
  if (a.entropy != nullptr && a.ent_acc == nullptr)
    throw std::invalid_argument("prefopt._C: entropy needs ent_acc");
  if (prefopt::is_centred(a.divergence) && a.ref_max != nullptr && a.ref_at_argmax == nullptr)
    throw std::invalid_argument("prefopt._C: this divergence needs ref_at_argmax");
  if (a.div != nullptr &&
      (a.div_s == nullptr || a.ref_max == nullptr ||
       (a.divergence == prefopt::kForwardKL && a.fkl_acc == nullptr) ||
       (a.divergence == prefopt::kReverseKL && a.rkl_acc == nullptr) ||
       prefopt::first_pass_divergence(a.divergence) == prefopt::kNoDivergence))
    throw std::invalid_argument(
        "prefopt._C: finalize's div is for forward / reverse KL, with div_s, the reference and its accumulator");
}

void validate(const FinishSweepArgs& a) {
  validate_finish(a);
  if (a.n_rows == 0) return;
  if (a.log_norm == nullptr || a.ref_log_norm == nullptr || a.value_sum == nullptr || a.centred_sum == nullptr ||
      a.div == nullptr || a.div_s == nullptr)
    throw std::invalid_argument(
        "prefopt._C: finish_sweep needs log_norm, ref_log_norm, value_sum, centred_sum, div and div_s");
}

// Runs a CPU entry point on `num_threads` threads (0: the OpenMP default), without the GIL.
template <typename Args>
void run_cpu(void (*kernel)(const Args&), Args args, int num_threads) {
  args.num_threads = num_threads;
  validate(args);
  py::gil_scoped_release nogil;
  kernel(args);
}

// Enqueues a CUDA entry point on `stream` (a cudaStream_t handle), without the GIL; a launch
// error becomes a RuntimeError naming the entry point.
template <typename Args, typename Kernel>
void run_cuda(Kernel kernel, const char* name, const Args& args, std::uintptr_t stream) {
#if defined(PREFOPT_WITH_CUDA)
  validate(args);
  if constexpr (std::is_same_v<Args, FoldArgs>) {
    if (args.candidates > 0) throw std::invalid_argument("prefopt._C: fold candidates are CPU only");
  }
  const char* err;
  {
    py::gil_scoped_release nogil;
    err = kernel(args, reinterpret_cast<void*>(stream));
  }
  if (err != nullptr) throw std::runtime_error(std::string("prefopt._C ") + name + ": " + err);
#else
  (void)kernel;
  (void)name;
  (void)args;
  (void)stream;
  throw std::runtime_error("prefopt_kernels._C was built without CUDA");
#endif
}

#if defined(PREFOPT_WITH_CUDA)
#define PREFOPT_CUDA_ENTRY(name) &prefopt::cuda::name
#else
#define PREFOPT_CUDA_ENTRY(name) nullptr
#endif

#define PREFOPT_WIRE_PARAM(type, name) wire_t<type> name,
#define PREFOPT_FROM_WIRE(type, name) args.name = from_wire<type>(name);

// cpu_<name>(<keyword parameters>, num_threads) and cuda_<name>(<keyword parameters>,
// stream) for every entry point: the parameters are converted into its argument struct.
#define PREFOPT_DEFINE_ENTRY(name, Args, PARAMS)                        \
  void cpu_##name(PARAMS(PREFOPT_WIRE_PARAM) int num_threads) {         \
    Args args;                                                          \
    PARAMS(PREFOPT_FROM_WIRE)                                           \
    run_cpu(&prefopt::cpu::name, args, num_threads);                    \
  }                                                                     \
  void cuda_##name(PARAMS(PREFOPT_WIRE_PARAM) std::uintptr_t stream) {  \
    Args args;                                                          \
    PARAMS(PREFOPT_FROM_WIRE)                                           \
    run_cuda(PREFOPT_CUDA_ENTRY(name), "cuda_" #name, args, stream);    \
  }
PREFOPT_ENTRY_POINTS(PREFOPT_DEFINE_ENTRY)
PREFOPT_TOKEN_ENTRY_POINTS(PREFOPT_DEFINE_ENTRY)
#undef PREFOPT_DEFINE_ENTRY

// A tuple of the field names of one list, for the Python side to check its own lists by.
py::tuple names(std::initializer_list<const char*> list) {
  py::tuple out(list.size());
  size_t i = 0;
  for (const char* name : list) out[i++] = py::str(name);
  return out;
}

}  // namespace

// The docstring of each cpu_ entry point; its cuda_ twin refers to it.
#define PREFOPT_DOC_forward                                                               \
  "Per-row statistics of the fused token ops on CPU tensors; writes the fp32 [n_rows] " \
  "outputs whose pointers are non-zero (row_max and log_norm always)."
#define PREFOPT_DOC_backward                                                                \
  "Gradient wrt logits on CPU, written into grad ([n_rows, vocab] in the logits dtype, "  \
  "may alias logits); the rows' vocabulary slice [v0, v0 + vocab) with global labels."
#define PREFOPT_DOC_fold                                                                     \
  "First pass over the vocabulary slice [v0, v0 + vocab) of CPU rows, merged into the "     \
  "running row state (fp32 [n_rows], argmax int64 global) at the non-zero pointers, in place."
#define PREFOPT_DOC_sweep                                                                      \
  "Second sweep of js/tv/hellinger/chi2/alpha over a vocabulary slice of CPU rows from the " \
  "final statistics, added into the fp32 [n_rows] value_sum and centred_sum in place "        \
  "(taken as 0 when first_slice is non-zero)."

#define PREFOPT_DOC_kept_tokens                                                                \
  "The kept tokens of a fused linear call over CPU int64 labels / fp32 weight [n_tokens]: "  \
  "their indices in order into index (int64 [n_tokens], -1 after them) and count, least and " \
  "greatest kept label into summary (int64 [3]; INT64_MAX, INT64_MIN when none)."

#define PREFOPT_DOC_finalize                                                                  \
  "The forward's fp32 [n_rows] statistics from CPU row states over the whole vocabulary, "   \
  "written at the non-zero pointers (a centred divergence's ref_at_argmax masked in place)."
#define PREFOPT_DOC_finish_sweep                                                            \
  "A second-sweep divergence's fp32 [n_rows] div and div_s from the summed CPU sweeps and " \
  "the final log_norm / ref_log_norm."

#define PREFOPT_PY_ARG(type, name) py::arg(#name),
#define PREFOPT_NAME(type, name) #name,

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "Native row kernels of prefopt_kernels (C++/OpenMP CPU and optional CUDA). Functions take "
      "raw pointers as ints, the [B, T, V] view as n_rows = B * T, tokens = T, vocab = V with "
      "batch and token strides in elements, and dtype codes "
      "(0 fp32, 1 bf16, 2 fp16); pointer 0 means absent. ROW_INPUTS, SAVED_STATS, SWEEP_STATS, "
      "TOKEN_OUTPUTS and ROW_STATE_FIELDS name the fields of the argument lists, in order.";
#define PREFOPT_DEF_ENTRY(name, Args, PARAMS)                                                   \
  m.def("cpu_" #name, &cpu_##name, PARAMS(PREFOPT_PY_ARG) py::arg("num_threads") = 0,          \
        PREFOPT_DOC_##name);                                                                    \
  m.def("cuda_" #name, &cuda_##name, PARAMS(PREFOPT_PY_ARG) py::arg("stream"),                 \
        "As cpu_" #name ", for CUDA device pointers, enqueued on the given cudaStream_t handle.");
  PREFOPT_ENTRY_POINTS(PREFOPT_DEF_ENTRY)
  PREFOPT_TOKEN_ENTRY_POINTS(PREFOPT_DEF_ENTRY)
#undef PREFOPT_DEF_ENTRY
  m.attr("ROW_INPUTS") = names({PREFOPT_ROW_INPUTS(PREFOPT_NAME)});
  m.attr("SAVED_STATS") = names({PREFOPT_SAVED_STATS(PREFOPT_NAME, PREFOPT_NAME, )});
  m.attr("SWEEP_STATS") = names({PREFOPT_SAVED_STATS(PREFOPT_NAME, PREFOPT_NO_FIELD, )});
  m.attr("TOKEN_OUTPUTS") = names({PREFOPT_TOKEN_OUTPUTS(PREFOPT_NAME)});
  m.attr("ROW_STATE_FIELDS") = names({PREFOPT_ROW_STATE_FIELDS(PREFOPT_NAME)});
  m.attr("MAX_CANDIDATES") = prefopt::kMaxCandidates;
  m.def(
      "divergence_traits",
      [](int code) {
        PREFOPT_DISPATCH_DIVERGENCE(code, DIV, (void)DIV);  // an unknown code: ValueError
        py::dict traits;
        traits["centred"] = prefopt::is_centred(code);
        traits["second_sweep"] = prefopt::needs_second_sweep(code);
        traits["first_pass_accumulator"] =
            prefopt::first_pass_divergence(code) != prefopt::kNoDivergence;
        return traits;
      },
      py::arg("code"),
      "The kernels' rules for a divergence code (0: none), for the Python registry to check: "
      "centred, second_sweep and first_pass_accumulator. ValueError for an unknown code.");
  m.def("has_cuda", []() {
#if defined(PREFOPT_WITH_CUDA)
    return true;
#else
    return false;
#endif
  }, "True when the module was compiled with the CUDA kernels.");
  m.def("cpu_isa", &prefopt::cpu::isa_name,
        "Instruction-set variant the CPU kernels run now: generic, avx2 or avx512. The widest "
        "one this CPU supports unless PREFOPT_CPU_ISA (read on first use; ValueError when it "
        "is unknown or cannot run here) or set_cpu_isa chose another.");
  m.def("supported_cpu_isas", &prefopt::cpu::supported_isas,
        "The CPU variants compiled in that this CPU runs, widest first (generic always).");
  m.def("set_cpu_isa", &prefopt::cpu::set_isa, py::arg("isa"),
        "Run the CPU kernels on the variant isa (one of supported_cpu_isas()) from the next "
        "call on, in every thread. ValueError naming isa when it is unknown or cannot run here.");
}
