// The C largest values of a row, gathered while the forward's first pass reads it, so that the
// sampler-matched log-probs need no second read of the row (prefopt_kernels/sampling.py turns
// them into its Candidates). Included by row_kernels_impl.h inside each variant's anonymous
// namespace (after <algorithm> and <functional>): every variant keeps its own copy, compiled
// with its own instruction set.
//
// A buffer of 2C floats: while it fills for the first time every value enters; after that a
// value enters only when it is above `threshold_`, the C-th largest value kept at the last
// compaction (a value equal to it cannot change the multiset of the C largest). When the buffer
// is full, nth_element moves its C largest to the front and the rest is dropped, so each value
// that enters costs O(1) amortised and the common case is one compare per element. A block
// whose maximum is not above the threshold is skipped whole. NaN never enters (its row's
// outputs are NaN whatever the candidates are).
#pragma once

class TopValues {
 public:
  // `storage` holds 2 * count floats; count >= 1.
  TopValues(int64_t count, float* storage) : count_(count), buf_(storage) {}

  // Offers the n fp32 values x, whose maximum is block_max.
  PREFOPT_INLINE void offer(const float* x, int64_t n, float block_max) {
    if (!filling_ && !(block_max > threshold_)) return;
    for (int64_t j = 0; j < n; ++j) {
      const float v = x[j];
      if (v > threshold_ || (filling_ && v == v)) {
        buf_[size_++] = v;
        if (size_ == 2 * count_) compact();
      }
    }
  }

  // Writes the C largest values offered, in descending order, to out[0, C), -inf padded.
  void finish(float* out) {
    if (size_ > count_) compact();
    std::sort(buf_, buf_ + size_, std::greater<float>());
    std::copy(buf_, buf_ + size_, out);
    std::fill(out + size_, out + count_, -kInf);
  }

 private:
  void compact() {
    std::nth_element(buf_, buf_ + (count_ - 1), buf_ + size_, std::greater<float>());
    threshold_ = buf_[count_ - 1];  // the smallest of the C kept
    size_ = count_;
    filling_ = false;
  }

  int64_t count_;
  float* buf_;
  int64_t size_ = 0;
  float threshold_ = -kInf;
  bool filling_ = true;
};
