// Index builders for the GPT datasets. They walk arrays of up to billions of entries, which is too slow
// in Python, so they live here and are compiled by `pip install -e .` (pybind11).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

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

// The dataset whose realised count lags its target share the most at sample `sample` (ties: lowest index).
// Megatron's rule: targets use max(sample, 1), so the first pick already follows the weights.
template <typename Active>
int64_t most_lagging_dataset(const Active &active_datasets, const double *weights, const int64_t *counts,
                             const int64_t sample) {
  const double position = std::max(static_cast<double>(sample), 1.0);
  int64_t chosen = -1;
  double largest_lag = std::numeric_limits<double>::lowest();
  for (const int64_t dataset : active_datasets) {
    const double lag = weights[dataset] * position - static_cast<double>(counts[dataset]);
    if (lag > largest_lag) {
      largest_lag = lag;
      chosen = dataset;
    }
  }
  return chosen;
}

template <typename T>
T *checked_output(py::array_t<T, py::array::c_style> &array, const int64_t size, const char *name) {
  if (array.ndim() != 1 || array.shape(0) < size) {
    throw std::invalid_argument(std::string(name) + " must be a 1-D array of at least " + std::to_string(size) +
                                " entries");
  }
  return array.mutable_data();
}

void check_dataset_count(const int64_t num_datasets, const int64_t num_weights) {
  if (num_datasets <= 0 || num_datasets > std::numeric_limits<int16_t>::max()) {
    throw std::invalid_argument("num_datasets must be in [1, 32767], got " + std::to_string(num_datasets));
  }
  if (num_weights != num_datasets) {
    throw std::invalid_argument("got " + std::to_string(num_weights) + " weights for " +
                                std::to_string(num_datasets) + " datasets");
  }
}

// Blend `size` samples: sample i comes from dataset_index[i], as that dataset's dataset_sample_index[i]-th
// sample, chosen greedily so that after every prefix each dataset's count stays within one of weight x n.
void build_blending_indices(py::array_t<int16_t, py::array::c_style> &dataset_index_array,
                            py::array_t<int64_t, py::array::c_style> &dataset_sample_index_array,
                            const py::array_t<double, py::array::c_style | py::array::forcecast> &weights_array,
                            const int32_t num_datasets, const int64_t size, const bool verbose) {
  check_dataset_count(num_datasets, weights_array.size());
  int16_t *dataset_index = checked_output(dataset_index_array, size, "dataset_index");
  int64_t *dataset_sample_index = checked_output(dataset_sample_index_array, size, "dataset_sample_index");
  const double *weights = weights_array.data();
  std::vector<int64_t> datasets(num_datasets);
  std::iota(datasets.begin(), datasets.end(), 0);
  std::vector<int64_t> counts(num_datasets, 0);
  {
    py::gil_scoped_release release;
    for (int64_t sample = 0; sample < size; ++sample) {
      const int64_t chosen = most_lagging_dataset(datasets, weights, counts.data(), sample);
      dataset_index[sample] = static_cast<int16_t>(chosen);
      dataset_sample_index[sample] = counts[chosen]++;
    }
  }
  if (verbose) {
    for (int64_t dataset = 0; dataset < num_datasets; ++dataset) {
      py::print("   dataset", dataset, "weight", weights[dataset], "achieved",
                size ? static_cast<double>(counts[dataset]) / static_cast<double>(size) : 0.0);
    }
  }
}

// Blend exactly sizes[i] samples of every dataset i, in proportion to those sizes, until all are spent.
void build_exhaustive_blending_indices(py::array_t<int16_t, py::array::c_style> &dataset_index_array,
                                       py::array_t<int64_t, py::array::c_style> &dataset_sample_index_array,
                                       const py::array_t<int64_t, py::array::c_style | py::array::forcecast> &sizes_array,
                                       const int32_t num_datasets) {
  check_dataset_count(num_datasets, sizes_array.size());
  const int64_t *sizes = sizes_array.data();
  int64_t total_size = 0;
  for (int64_t dataset = 0; dataset < num_datasets; ++dataset) {
    if (sizes[dataset] < 0) {
      throw std::invalid_argument("dataset sizes must not be negative");
    }
    total_size += sizes[dataset];
  }
  int16_t *dataset_index = checked_output(dataset_index_array, total_size, "dataset_index");
  int64_t *dataset_sample_index = checked_output(dataset_sample_index_array, total_size, "dataset_sample_index");
  std::vector<double> weights(num_datasets);
  std::vector<int64_t> unspent;
  for (int64_t dataset = 0; dataset < num_datasets; ++dataset) {
    weights[dataset] = static_cast<double>(sizes[dataset]) / static_cast<double>(total_size);
    if (sizes[dataset] > 0) {
      unspent.push_back(dataset);
    }
  }
  std::vector<int64_t> counts(num_datasets, 0);
  {
    py::gil_scoped_release release;
    for (int64_t sample = 0; sample < total_size; ++sample) {
      const int64_t chosen = most_lagging_dataset(unspent, weights.data(), counts.data(), sample);
      dataset_index[sample] = static_cast<int16_t>(chosen);
      dataset_sample_index[sample] = counts[chosen]++;
      if (counts[chosen] == sizes[chosen]) {
        unspent.erase(std::find(unspent.begin(), unspent.end(), chosen));
      }
    }
  }
}

}  // namespace

PYBIND11_MODULE(helpers_cpp, module) {
  module.doc() = "C++ index builders for megatron.core.datasets";
  module.def("build_sample_idx_int32", &build_sample_idx<int32_t>);
  module.def("build_sample_idx_int64", &build_sample_idx<int64_t>);
  // The output arrays are written in place, so they must already have the right dtype (no silent copy).
  module.def("build_blending_indices", &build_blending_indices, py::arg("dataset_index").noconvert(),
             py::arg("dataset_sample_index").noconvert(), py::arg("weights"), py::arg("num_datasets"),
             py::arg("size"), py::arg("verbose"));
  module.def("build_exhaustive_blending_indices", &build_exhaustive_blending_indices,
             py::arg("dataset_index").noconvert(), py::arg("dataset_sample_index").noconvert(),
             py::arg("sizes"), py::arg("num_datasets"));
}
