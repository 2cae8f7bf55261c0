// The kept tokens on the CPU: one sequential pass, compacting the indices in order and
// tracking the kept labels' range (a few ns per token, next to the tiles' GEMMs of H
// multiply-adds per token and vocabulary entry); compiled once, not per instruction set.
#include <cstdint>

#include "cpu/row_kernels.h"
#include "prefopt/kept_tokens.h"

namespace prefopt {
namespace cpu {

void kept_tokens(const KeptTokensArgs& args) {
  KeptSummary kept;
  for (int64_t n = 0; n < args.n_tokens; ++n) {
    if (!is_kept(args.labels, args.weight, args.ignore_index, n)) continue;
    args.index[kept.count++] = n;
    if (args.labels != nullptr) kept.add_label(args.labels[n]);
  }
  for (int64_t n = kept.count; n < args.n_tokens; ++n) args.index[n] = -1;
  args.summary[0] = kept.count;
  args.summary[1] = kept.low;
  args.summary[2] = kept.high;
}

}  // namespace cpu
}  // namespace prefopt
