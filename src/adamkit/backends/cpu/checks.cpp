// The step cache's per-tensor checks (step_cache.py, and PreparedBucket.refresh in
// __init__.py), in C++ against torch's headers: the same decisions as the Python code,
// which stays the specification and the fallback (native_checks.py says how this is
// built and when it is used).
//
// Why C++: between two steps the tensors' Python objects, TensorImpls and storages have
// been pushed out of the caches (a step streams hundreds of MB), and the Python checks
// wait for those misses one at a time, about 3 us per tensor. Here each check runs in
// passes over all tensors of a bucket, prefetching what the next pass reads, so the
// misses of different tensors overlap; the longest checks split the tensors between
// torch's threads, each core overlapping its own misses (in_parallel below).
//
// Every function returns 1 when everything it checks holds and 0 otherwise; it never
// raises (a C++ exception must not cross ctypes) and never changes a tensor (but for
// giving a copy-on-write one its own copy where it reads its address, as Tensor.data_ptr()
// does).
#include <c10/core/impl/COW.h>
#include <torch/csrc/autograd/python_variable.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

inline void prefetch(const void* p) { __builtin_prefetch(p); }

// Tensor or Parameter exactly (a subclass may mean something else by its data);
// nullptr otherwise.
inline c10::TensorImpl* impl_of(PyObject* obj) {
  if (obj == nullptr || !THPVariable_CheckExact(obj)) return nullptr;
  return THPVariable_Unpack(obj).unsafeGetTensorImpl();
}

// The lines of a StorageImpl that address() reads: the data pointer, and the flags after it.
inline void prefetch_storage(const c10::TensorImpl* t) {
  const char* s = reinterpret_cast<const char*>(t->storage().unsafeGetStorageImpl());
  prefetch(s);
  prefetch(s + 64);
}

inline void prefetch_impl(const c10::TensorImpl* t) {
  prefetch(t);
  prefetch(reinterpret_cast<const char*>(t) + 64);
  prefetch(reinterpret_cast<const char*>(t) + 128);
}

// What Tensor.data_ptr() returns: TensorImpl::mutable_data(), which (as there) first gives
// a copy-on-write tensor its own copy, so that the kernel never writes into shared memory.
inline int64_t address(c10::TensorImpl* t) {
  return reinterpret_cast<int64_t>(t->mutable_data());
}

// The TensorImpls of items [lo, hi), Tensors or Parameters exactly, each prefetched (the
// first pass over a cold list); false where an item is not one.
inline bool impls_range(PyObject** items, Py_ssize_t lo, Py_ssize_t hi, c10::TensorImpl** impls) {
  for (Py_ssize_t i = lo; i < hi; ++i) prefetch(items[i]);
  for (Py_ssize_t i = lo; i < hi; ++i) {
    if ((impls[i] = impl_of(items[i])) == nullptr) return false;
    prefetch_impl(impls[i]);
  }
  return true;
}

// The same for a whole list; false where it is not a list.
inline bool list_impls(PyObject* list, std::vector<c10::TensorImpl*>& impls) {
  if (!PyList_Check(list)) return false;
  impls.resize(PyList_GET_SIZE(list));
  return impls_range(reinterpret_cast<PyListObject*>(list)->ob_item, 0, impls.size(), impls.data());
}

// What a share of a check (a range of its tensors) finds: FAILS and HOLDS are the check's
// answer; AGAIN_SERIALLY, that a tensor must be read on the calling thread (off_thread below).
enum Verdict : int { FAILS = 0, AGAIN_SERIALLY = 1, HOLDS = 2 };

// Whether the calling thread must read `t` itself: where t dispatches to Python (a tensor
// subclass: its sizes, strides, device or layout may be computed in Python, which on
// another thread would wait for the GIL its caller holds), or where reading its address
// runs a materializer (a copy-on-write storage's, which gives it its own copy: two threads
// must not do that to one storage at once, and params that are views of one buffer share it).
template <class S>
bool lazy(const S* s) {
  if constexpr (requires { s->has_materializer(); }) {
    return s->has_materializer();
  } else {  // torch before 2.6: copy-on-write is the only materializer
    return c10::impl::cow::is_cow_data_ptr(s->data_ptr());
  }
}
inline bool off_thread(const c10::TensorImpl* t) {
  if (t->is_python_dispatch()) return true;
  const c10::StorageImpl* s = t->unsafe_storage().unsafeGetStorageImpl();
  return s != nullptr && lazy(s);
}

// range(lo, hi, split) over [0, n), split between up to n_threads threads (torch's count)
// with at least PER_THREAD of `objects` (the tensors the check reads) each: below that,
// waking a thread costs more than it saves. With split, a range answers AGAIN_SERIALLY
// before it reads a tensor that off_thread() keeps on the calling thread, and the whole
// check then runs there, unsplit (as it did on one thread before; it decides the same).
// 1 where the check holds.
//
// The caller holds the GIL and waits in the region's barrier while the other threads read
// Python objects: no Python code runs meanwhile (off_thread), and what the ranges do is
// read-only (no reference counts, no errors set, no str hashed, no materializer run).
//
// The pool is torch's (libgomp, loaded by torch, is the one these OpenMP calls bind to)
// and the kernel's: where its threads sleep, this region takes the wake-up the kernel's
// would have had. At 1024 tensors on Zen 5, cold, the state check takes 0.54-0.78 of its
// time on one thread, and whole steps 0.94-0.99 (RESULTS.md, "Zen 5, session 26"; measured
// before the check compared element counts and layouts too).
constexpr Py_ssize_t PER_THREAD = 128;

template <class Range>
int in_parallel(Py_ssize_t n, Py_ssize_t objects, int n_threads, const Range& range) {
  const int most = static_cast<int>(std::max<Py_ssize_t>(1, std::min<Py_ssize_t>(n_threads, objects / PER_THREAD)));
  if (most == 1) return range(0, n, false) == HOLDS;
  int verdict = HOLDS;  // the least of the shares': FAILS, else AGAIN_SERIALLY, else HOLDS
#pragma omp parallel num_threads(most) reduction(min : verdict)
  {
    const Py_ssize_t nth = omp_get_num_threads(), me = omp_get_thread_num();
    try {  // an exception must not leave the region
      verdict = range(n * me / nth, n * (me + 1) / nth, true);
    } catch (...) {
      verdict = FAILS;
    }
  }
  if (verdict == AGAIN_SERIALLY) verdict = range(0, n, false);
  return verdict == HOLDS;
}

// Which of `keys` (exact str, with their hashes) `key` is, or -1: the same object, or an
// exact str equal to it (a key read back from a checkpoint need not be the interned
// literal). A key of any other type is none of them: an equal one could not be in the
// dict beside the str, so if it stands for one of `keys`, that key is missing and the
// check fails, safely. The hash is the one the str caches (a dict's key has it: inserting
// it computed it; -1 where not, and then only the comparison decides).
inline Py_ssize_t key_index(PyObject* keys, const std::vector<Py_hash_t>& hashes, PyObject* key) {
  const Py_ssize_t n_keys = PyTuple_GET_SIZE(keys);
  for (Py_ssize_t k = 0; k < n_keys; ++k) {
    if (PyTuple_GET_ITEM(keys, k) == key) return k;
  }
  if (!PyUnicode_CheckExact(key)) return -1;
  const Py_hash_t hash = reinterpret_cast<PyASCIIObject*>(key)->hash;
  for (Py_ssize_t k = 0; k < n_keys; ++k) {
    if ((hash == -1 || hashes[k] == hash) && PyUnicode_Compare(PyTuple_GET_ITEM(keys, k), key) == 0) {
      return k;
    }
  }
  return -1;
}

// What of a tensor's layout its address does not say, in one number (step_cache.py
// computes the same for the plan): dtype, contiguity, the negative bit.
inline int64_t layout_code(const c10::TensorImpl* t) {
  // (typeMetaToScalarType: TypeMeta::toScalarType() is not const in torch 2.6 and older,
  // whose headers refused it on the const TypeMeta dtype() returns)
  return static_cast<int64_t>(c10::typeMetaToScalarType(t->dtype())) + 256 * t->is_contiguous() + 512 * t->is_neg();
}

// A tuple of exact str and their hashes (for key_index); false where it is not one.
inline bool str_hashes(PyObject* keys, std::vector<Py_hash_t>& hashes) {
  if (!PyTuple_Check(keys)) return false;
  hashes.resize(PyTuple_GET_SIZE(keys));
  for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(keys); ++k) {
    PyObject* key = PyTuple_GET_ITEM(keys, k);
    if (!PyUnicode_CheckExact(key) || (hashes[k] = PyObject_Hash(key)) == -1) {
      PyErr_Clear();
      return false;
    }
  }
  return true;
}

// The keys a state check reads: the planned tensors' and the planned tags' (the 0-dim
// tensors under "state_format" and "param_update", compared by identity).
struct StateKeys {
  PyObject* keys;
  std::vector<Py_hash_t> hashes;
  PyObject* tags;
  std::vector<Py_hash_t> tag_hashes;
};

// adamkit_state_ptrs_equal for dicts [lo, hi) of n: values[k * n + i], impls likewise;
// planned[r * n * n_keys + k * n + i]: row r of the planned tensor's (address, object,
// element count, layout code); tag_objects[k * n + i]: the planned object of tag k, and for
// a tag that is a tensor, tag_objects[(n_tags + k) * n + i] its version counter (-1: none)
// and tag_objects[(2 * n_tags + k) * n + i] its address.
Verdict state_ptrs_range(PyObject** dicts, Py_ssize_t lo, Py_ssize_t hi, bool split, Py_ssize_t n,
                         const StateKeys& sk, const int64_t* planned, const int64_t* tag_objects,
                         PyObject** values, c10::TensorImpl** impls) {
  PyObject* keys = sk.keys;
  const Py_ssize_t n_keys = PyTuple_GET_SIZE(keys), n_tags = PyTuple_GET_SIZE(sk.tags);
  for (Py_ssize_t i = lo; i < hi; ++i) prefetch(dicts[i]);
  for (Py_ssize_t i = lo; i < hi; ++i) {
    if (!PyDict_Check(dicts[i])) return FAILS;
    Py_ssize_t pos = 0, found = 0, tags_found = 0;
    PyObject *key, *value;
    while (PyDict_Next(dicts[i], &pos, &key, &value)) {
      const Py_ssize_t k = key_index(keys, sk.hashes, key);
      if (k >= 0) {
        values[k * n + i] = value;
        prefetch(value);
        ++found;
      } else if (const Py_ssize_t t = key_index(sk.tags, sk.tag_hashes, key); t >= 0) {
        // a tag edited or replaced: the full path reads the state by its tags
        if (reinterpret_cast<int64_t>(value) != tag_objects[t * n + i]) return FAILS;
        // a tag tensor written in place (dcp.load copies a checkpoint's into it) or given
        // other memory: the full path reads its value
        if (c10::TensorImpl* tag = impl_of(value)) {
          const auto& counter = tag->version_counter();
          const int64_t version = counter.enabled() ? int64_t(counter.current_version()) : -1;
          if (version != tag_objects[(n_tags + t) * n + i] || !tag->has_storage() ||
              address(tag) != tag_objects[(2 * n_tags + t) * n + i]) {
            return FAILS;
          }
        }
        ++tags_found;
      }
    }
    // a key or tag missing (each is found at most once)
    if (found != n_keys || tags_found != n_tags) return FAILS;
  }
  const Py_ssize_t total = n * n_keys;
  const int64_t *addresses = planned, *objects = planned + total, *numels = planned + 2 * total,
                *codes = planned + 3 * total;
  for (Py_ssize_t k = 0; k < n_keys; ++k) {
    for (Py_ssize_t i = lo; i < hi; ++i) {  // (the values were prefetched above)
      const Py_ssize_t j = k * n + i;
      // the planned object (one put back where a freed one was may have its address)
      if (reinterpret_cast<int64_t>(values[j]) != objects[j]) return FAILS;
      if ((impls[j] = impl_of(values[j])) == nullptr) return FAILS;
      prefetch_impl(impls[j]);
    }
  }
  for (Py_ssize_t k = 0; k < n_keys; ++k) {
    for (Py_ssize_t i = lo; i < hi; ++i) prefetch_storage(impls[k * n + i]);
  }
  for (Py_ssize_t k = 0; k < n_keys; ++k) {
    for (Py_ssize_t i = lo; i < hi; ++i) {
      const Py_ssize_t j = k * n + i;
      c10::TensorImpl* t = impls[j];
      if (split && off_thread(t)) return AGAIN_SERIALLY;
      // resized, recast, restrided or negated in place: the kernel would write past its
      // end or misread it
      if (!t->has_storage() || t->numel() != numels[j] || layout_code(t) != codes[j] ||
          address(t) != addresses[j]) {
        return FAILS;
      }
    }
  }
  return HOLDS;
}

// adamkit_refresh for params [lo, hi): ps[i] their impls, grad_ptrs[i] their grads' addresses.
// shapes: the planned params' sizes, param i's at shapes[offsets[i]] to shapes[offsets[i + 1]].
Verdict refresh_range(PyObject** items, Py_ssize_t lo, Py_ssize_t hi, bool split, c10::ScalarType dtype,
                      const int64_t* param_ptrs, const int64_t* grad_nbytes, const int64_t* shapes,
                      const int64_t* offsets, c10::TensorImpl** ps, c10::TensorImpl** gs,
                      int64_t* grad_ptrs) {
  if (!impls_range(items, lo, hi, ps)) return FAILS;
  for (Py_ssize_t i = lo; i < hi; ++i) {
    prefetch(ps[i]->autograd_meta());
    prefetch_storage(ps[i]);
  }
  for (Py_ssize_t i = lo; i < hi; ++i) {
    const at::Tensor& g = THPVariable_Unpack(items[i]).grad();
    if (!g.defined()) return FAILS;
    gs[i] = g.unsafeGetTensorImpl();
    prefetch_impl(gs[i]);
  }
  for (Py_ssize_t i = lo; i < hi; ++i) {
    c10::TensorImpl* p = ps[i];
    if (split && off_thread(p)) return AGAIN_SERIALLY;
    if (p->is_neg()) return FAILS;  // the kernel reads memory, not the negative bit
    if (!p->has_storage() || c10::typeMetaToScalarType(p->dtype()) != dtype || !p->is_contiguous() ||
        address(p) != param_ptrs[i]) {
      return FAILS;
    }
    c10::TensorImpl* g = gs[i];
    // A wrapper subclass (Python dispatch, as the Python refresh's is_wrapper) has no
    // storage of its values (the kernel would read address 0); and its accessors may run
    // Python, which a thread of the split refresh must not.
    if (g->is_python_dispatch()) return FAILS;
    if (g->is_neg() || g->_is_zerotensor()) return FAILS;  // a negative bit; no memory at all
    if (g->layout() != c10::kStrided || !g->device().is_cpu() || !g->has_storage()) return FAILS;
    prefetch_storage(g);
  }
  for (Py_ssize_t i = lo; i < hi; ++i) {
    c10::TensorImpl* g = gs[i];
    if (c10::typeMetaToScalarType(g->dtype()) != dtype || !g->is_contiguous() ||
        static_cast<int64_t>(g->numel() * g->itemsize()) != grad_nbytes[i] ||
        g->sizes() != ps[i]->sizes()) {  // a grad reshaped through `.grad.data =`
      return FAILS;
    }
    // and the planned shape: a param reshaped through `.data =` (its state keeps the old
    // one, and the full path raises for it)
    const c10::IntArrayRef planned(shapes + offsets[i], static_cast<size_t>(offsets[i + 1] - offsets[i]));
    if (ps[i]->sizes() != planned) return FAILS;
  }
  for (Py_ssize_t i = lo; i < hi; ++i) {
    if (split && off_thread(gs[i])) return AGAIN_SERIALLY;
    grad_ptrs[i] = address(gs[i]);
  }
  return HOLDS;
}

}  // namespace

extern "C" {

int adamkit_checks_version() { return 8; }

// torch's ScalarType number of a tensor's dtype, or -1 for anything else: the planned
// dtype the other checks compare with.
int adamkit_scalar_type(PyObject* tensor) {
  c10::TensorImpl* t = impl_of(tensor);
  return t == nullptr ? -1 : static_cast<int>(c10::typeMetaToScalarType(t->dtype()));
}

// Whether `container` (a list, or a dict's keys and values) holds exactly the objects at
// the given addresses, in order (step_cache: identity checks). Compares addresses only:
// it reads none of the objects, which the cache keeps alive, so an address is not reused.
int adamkit_list_is(PyObject* list, const int64_t* addresses, int64_t n) {
  if (!PyList_Check(list) || PyList_GET_SIZE(list) != n) return 0;
  PyObject** items = reinterpret_cast<PyListObject*>(list)->ob_item;
  for (int64_t i = 0; i < n; ++i) {
    if (reinterpret_cast<int64_t>(items[i]) != addresses[i]) return 0;
  }
  return 1;
}

int adamkit_dict_is(PyObject* dict, const int64_t* keys, const int64_t* values, int64_t n) {
  if (!PyDict_Check(dict) || PyDict_GET_SIZE(dict) != n) return 0;
  Py_ssize_t pos = 0, i = 0;
  PyObject *key, *value;
  while (PyDict_Next(dict, &pos, &key, &value)) {  // insertion order, as list(d.items())
    if (i >= n || reinterpret_cast<int64_t>(key) != keys[i] ||
        reinterpret_cast<int64_t>(value) != values[i]) {
      return 0;
    }
    ++i;
  }
  return i == n;
}

// Whether exactly the params with has_grad[i] != 0 have a grad (step_cache: "the same
// params have grads").
int adamkit_grads_present(PyObject* params, const uint8_t* has_grad) {
  try {
    std::vector<c10::TensorImpl*> impls;
    if (!list_impls(params, impls)) return 0;
    const Py_ssize_t n = PyList_GET_SIZE(params);
    PyObject** items = reinterpret_cast<PyListObject*>(params)->ob_item;
    for (Py_ssize_t i = 0; i < n; ++i) prefetch(impls[i]->autograd_meta());
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (THPVariable_Unpack(items[i]).grad().defined() != (has_grad[i] != 0)) return 0;
    }
    return 1;
  } catch (...) {
    return 0;
  }
}

// For each dict in `states` and each key in `keys` (a tuple of exact str): dict[key] is the
// planned tensor, at its planned address, with its element count and layout (`planned`:
// state_ptrs_range; step_cache: the bucket's state tensors); and for each key in `tags`
// (exact str too), dict[key] is the planned object, tag_objects[k * n + i] (the tags the
// state's format is read by), a tensor one at its planned version and address.
//
// Each dict is walked once with PyDict_Next instead of being looked up once per key, and
// the values are held as borrowed references: nothing here runs Python code (keys are
// matched by identity or as exact str, never through an __eq__), so no dict can change
// before the last read. Cold, at 1024 tensors on Zen 5, this check took 0.77-0.84 of the
// time of lookups with owned references (fp32 state), 0.73-0.76 (int8) and 0.66-0.69
// (bf16 kahan int8; paired ratios, 61 rounds each way), which also prefetched one line of
// each StorageImpl where address() reads two; that on one thread.
int adamkit_state_ptrs_equal(PyObject* states, PyObject* keys, const int64_t* planned, int n_threads,
                             PyObject* tags, const int64_t* tag_objects) {
  try {
    StateKeys sk{keys, {}, tags, {}};
    if (!PyList_Check(states) || !str_hashes(keys, sk.hashes) || !str_hashes(tags, sk.tag_hashes)) return 0;
    const Py_ssize_t n = PyList_GET_SIZE(states), n_keys = PyTuple_GET_SIZE(keys);
    PyObject** dicts = reinterpret_cast<PyListObject*>(states)->ob_item;
    std::vector<PyObject*> values(n * n_keys, nullptr);
    std::vector<c10::TensorImpl*> impls(n * n_keys);
    return in_parallel(n, n * n_keys, n_threads, [&](Py_ssize_t lo, Py_ssize_t hi, bool split) {
      return state_ptrs_range(dicts, lo, hi, split, n, sk, planned, tag_objects, values.data(), impls.data());
    });
  } catch (...) {
    return 0;
  }
}

// PreparedBucket.refresh for the kernel's params: each param keeps its planned address,
// dtype and contiguity, and has no negative bit; its grad is a dense, contiguous CPU
// tensor of the planned dtype, of grad_nbytes[i] bytes and of its param's shape, with
// memory of its own values (no wrapper subclass, negative bit or zero tensor). Then (and
// only then) grad_row[i] = the grad's address, and held[i] = the grad.
int adamkit_refresh(PyObject* params, int scalar_type, const int64_t* param_ptrs,
                    const int64_t* grad_nbytes, const int64_t* shapes, const int64_t* offsets,
                    int64_t* grad_row, int n_threads, PyObject* held) {
  try {
    if (!PyList_Check(params) || !PyList_Check(held)) return 0;
    const Py_ssize_t n = PyList_GET_SIZE(params);
    if (PyList_GET_SIZE(held) != n) return 0;
    PyObject** items = reinterpret_cast<PyListObject*>(params)->ob_item;
    const auto dtype = static_cast<c10::ScalarType>(scalar_type);
    std::vector<c10::TensorImpl*> ps(n), gs(n);
    std::vector<int64_t> grad_ptrs(n);
    const int ok = in_parallel(n, n, n_threads, [&](Py_ssize_t lo, Py_ssize_t hi, bool split) {
      return refresh_range(items, lo, hi, split, dtype, param_ptrs, grad_nbytes, shapes, offsets, ps.data(),
                           gs.data(), grad_ptrs.data());
    });
    if (!ok) return 0;
    // The grads' Python objects into `held`, which keeps them alive until the kernel has
    // read them: the kernel runs without the GIL, and another thread's zero_grad() could
    // free memory whose address is in the table. (Once all checks hold: nothing is left
    // to fail. `held` comes filled with None, and a failure leaves the table as it was.)
    // First a reference to each checked grad, which runs no Python: wrapping one may
    // allocate its Python object, and an allocation may run the garbage collector's
    // callbacks and let another thread clear a later grad.
    std::vector<at::Tensor> grads(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      grads[i] = THPVariable_Unpack(items[i]).grad();
      if (grads[i].unsafeGetTensorImpl() != gs[i]) return 0;
    }
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* grad = THPVariable_Wrap(grads[i]);
      if (grad == nullptr) return 0;
      PyList_SetItem(held, i, grad);  // steals the reference, releases the old item
    }
    std::copy(grad_ptrs.begin(), grad_ptrs.end(), grad_row);
    return ok;
  } catch (...) {
    return 0;
  }
}

// torch.autograd.graph.increment_version(params) after the kernel wrote them: one bump of
// each version counter a param has (an inference tensor has none, and is skipped there
// too). torch's loop takes each counter's cache miss behind a locked increment, one after
// another: 0.26 ms for 1024 params after a step streamed them out of the caches (Zen 5).
// Here plain loads bring the counters in, overlapped, and the increments then hit.
// Returns 0, having bumped nothing, where an item is not a Tensor or Parameter exactly.
int adamkit_bump_versions(PyObject* params) {
  try {
    std::vector<c10::TensorImpl*> impls;
    if (!list_impls(params, impls)) return 0;
    uint32_t loaded = 0;  // loads independent of one another (atomic: not elided)
    for (auto* t : impls) {
      if (t->version_counter().enabled()) loaded += t->version_counter().current_version();
    }
    for (auto* t : impls) {
      if (t->version_counter().enabled()) t->bump_version();
    }
    volatile uint32_t sink = loaded;
    (void)sink;
    return 1;
  } catch (...) {
    return 0;
  }
}

}  // extern "C"
