// Index builders for the GPT datasets. They walk arrays of up to billions of entries, which is too slow
// in Python, so they live here and are compiled by `pip install -e .` (pybind11).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

// The sample index: row i holds (position in document_index, token offset in that document) where
// sample i starts; sample i ends where sample i + 1 starts, plus `extra_token` tokens so that the
// labels of one sample overlap the first input token of the next.
template <typename IndexT>
py::array_t<IndexT> build_sample_idx(const py::array_t<int32_t, py::array::c_style> &sizes_array,
                                     const py::array_t<int32_t, py::array::c_style> &document_index_array,
                                     const int64_t sequence_length, const int64_t num_epochs,
                                     const int64_t tokens_per_epoch, const bool drop_last_partial_sequence,
                                     const int64_t extra_token) {
  if (sequence_length <= 0) {
    throw std::invalid_argument("sequence_length must be positive, got " + std::to_string(sequence_length));
  }
  const auto sizes = sizes_array.unchecked<1>();
  const auto document_index = document_index_array.unchecked<1>();
  const int64_t num_documents = document_index.shape(0);

  const int64_t total_tokens = num_epochs * tokens_per_epoch - extra_token;
  int64_t num_samples = total_tokens / sequence_length;
  if (!drop_last_partial_sequence && total_tokens % sequence_length != 0) {
    num_samples += 1;
  }
  if (num_samples < 0) {
    num_samples = 0;
  }

  auto *sample_index = new IndexT[2 * (num_samples + 1)];
  py::capsule owner(sample_index, [](void *data) { delete[] static_cast<IndexT *>(data); });

  int64_t document_position = 0;  // position in document_index
  int64_t offset = 0;             // token offset inside the current document
  sample_index[0] = 0;
  sample_index[1] = 0;
  {
    py::gil_scoped_release release;
    for (int64_t sample = 1; sample <= num_samples; ++sample) {
      int64_t remaining = sequence_length + extra_token;
      while (remaining > 0) {
        const int64_t document_length = sizes[document_index[document_position]] - offset;
        if (document_length >= remaining) {
          // The sample ends inside this document; the next starts `extra_token` back so tokens overlap.
          offset += remaining - extra_token;
          remaining = 0;
        } else if (document_position == num_documents - 1) {
          // Out of documents: only reachable for the kept partial last sample.
          offset = sizes[document_index[document_position]] - extra_token;
          remaining = 0;
        } else {
          remaining -= document_length;
          ++document_position;
          offset = 0;
        }
      }
      sample_index[2 * sample] = static_cast<IndexT>(document_position);
      sample_index[2 * sample + 1] = static_cast<IndexT>(offset);
    }
  }
  return py::array_t<IndexT>({num_samples + 1, static_cast<int64_t>(2)}, sample_index, owner);
}

}  // namespace

PYBIND11_MODULE(helpers_cpp, module) {
  module.doc() = "C++ index builders for megatron.core.datasets";
  module.def("build_sample_idx_int32", &build_sample_idx<int32_t>);
  module.def("build_sample_idx_int64", &build_sample_idx<int64_t>);
}
