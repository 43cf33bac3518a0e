// The compiled call path of fxopt's generated kernels (fxopt/runtime/native.py, NOTE [Native call path]).
//
// One `call(inputs)` per kernel, a builtin bound to that kernel's state: it matches the inputs against the plans
// the Python path made (exact shapes, strides, dtype and device), allocates the outputs with the caching allocator,
// and launches: cuLaunchKernel for CUDA kernels, the generated function for C++ ones. Anything it does not
// recognize -- an unknown layout, a tensor subclass, a launch error -- goes to the Python path (`fallback`), which
// makes the plan, raises the clear error, or retries; this file never decides what a kernel may be called with.
// The same holds for the replay of a captured CUDA graph (`graph_call`, below).
#include <Python.h>

#include <ATen/ops/empty_strided.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace {

// cuLaunchKernel, whose address the Python side passes in (it already holds libcuda).
using cu_launch_fn = int (*)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*,
                             void**, void**);
// The generated C++ entry points (fxopt/codegen/printer.py, fxopt/codegen/rowwise.py).
using cpu_flat_fn = void (*)(void**, int64_t);
using cpu_strided_fn = void (*)(void**, const int64_t*, const int64_t*, int64_t);
using cpu_args_fn = void (*)(void**, const int64_t*);

enum Kind : int { kNone = 0, kCuda = 1, kCpuFlat = 2, kCpuStrided = 3, kCpuArgs = 4 };
constexpr size_t kMaxTensors = 64;   // inputs + outputs of one kernel
constexpr size_t kMaxParams = 1024;  // kernel parameters (pointers, then 8-byte values)

struct InputKey {
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  c10::Device device;
};

struct Plan {
  std::vector<InputKey> inputs;
  std::vector<std::vector<int64_t>> out_sizes, out_strides;
  Kind kind = kNone;
  void* fn = nullptr;              // CUfunction, or the C++ entry point
  cu_launch_fn launch = nullptr;   // CUDA
  unsigned grid[3] = {1, 1, 1}, block[3] = {1, 1, 1}, shared_mem = 0;
  std::vector<int64_t> tail;       // CUDA: parameters after the pointers; C++: numel, or the argument array
  std::vector<int64_t> sizes, strides;  // C++ strided path
};

struct Kernel {
  size_t n_in = 0;
  std::vector<at::ScalarType> out_dtypes;
  c10::Device device{c10::kCPU};
  PyObject* fallback = nullptr;    // the Python call path: fallback(inputs) -> list of outputs
  PyObject* stream_fn = nullptr;   // torch._C._cuda_getCurrentRawStream (CUDA kernels)
  PyObject* stream_arg = nullptr;  // its device index
  PyTypeObject* tensor_type = nullptr;
  PyTypeObject* param_type = nullptr;
  std::vector<std::unique_ptr<Plan>> plans;  // append-only: a Plan* stays valid while the GIL is released
  std::string name;    // the kernel's name, as the call's __name__ (what an FX graph's code shows)
  PyMethodDef def{};   // the call's method definition: it must live as long as the call

  ~Kernel() {
    Py_XDECREF(fallback);
    Py_XDECREF(stream_fn);
    Py_XDECREF(stream_arg);
    Py_XDECREF((PyObject*)tensor_type);
    Py_XDECREF((PyObject*)param_type);
  }
};

constexpr const char* kCapsule = "fxopt.native_kernel";

void destroy(PyObject* capsule) { delete static_cast<Kernel*>(PyCapsule_GetPointer(capsule, kCapsule)); }

bool matches(const InputKey& key, const at::Tensor& t) {
  return t.scalar_type() == key.dtype && t.device() == key.device && t.sizes().equals(key.sizes) &&
         t.strides().equals(key.strides);
}

PyObject* call_fallback(Kernel* k, PyObject* inputs) { return PyObject_CallOneArg(k->fallback, inputs); }

// call(inputs) bound to one kernel: `self` is the kernel's capsule.
PyObject* call(PyObject* self, PyObject* inputs) {
  auto* k = static_cast<Kernel*>(PyCapsule_GetPointer(self, kCapsule));
  if (k == nullptr) return nullptr;
  if (!PyList_CheckExact(inputs) && !PyTuple_CheckExact(inputs)) return call_fallback(k, inputs);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(inputs);
  if (static_cast<size_t>(n) != k->n_in || k->n_in + k->out_dtypes.size() > kMaxTensors)
    return call_fallback(k, inputs);
  PyObject** items = PySequence_Fast_ITEMS(inputs);
  const at::Tensor* tensors[kMaxTensors];
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyTypeObject* type = Py_TYPE(items[i]);
    // Plain tensors and parameters only: a subclass (FakeTensor, DTensor, ...) may not own real memory.
    if (type != k->tensor_type && type != k->param_type) return call_fallback(k, inputs);
    tensors[i] = &THPVariable_Unpack(items[i]);
  }
  const size_t n_out = k->out_dtypes.size();
  std::vector<at::Tensor> outs;
  Plan* plan = nullptr;
  try {
    for (const auto& p : k->plans) {
      bool ok = true;
      for (Py_ssize_t i = 0; ok && i < n; ++i)
        ok = tensors[i]->layout() == at::kStrided && matches(p->inputs[i], *tensors[i]);
      if (ok) {
        plan = p.get();
        break;
      }
    }
    if (plan == nullptr) return call_fallback(k, inputs);  // the Python path makes the plan (and registers it)
    outs.reserve(n_out);
    for (size_t j = 0; j < n_out; ++j)
      outs.push_back(at::empty_strided(plan->out_sizes[j], plan->out_strides[j],
                                       at::TensorOptions().dtype(k->out_dtypes[j]).device(k->device)));
  } catch (...) {
    return call_fallback(k, inputs);  // e.g. out of memory: the Python path raises torch's own error
  }
  void* ptrs[kMaxTensors];
  for (Py_ssize_t i = 0; i < n; ++i) ptrs[i] = const_cast<void*>(tensors[i]->const_data_ptr());
  for (size_t j = 0; j < n_out; ++j) ptrs[n + j] = outs[j].data_ptr();
  const size_t n_ptrs = n + n_out;

  if (plan->kind == kCuda) {
    PyObject* s = PyObject_CallOneArg(k->stream_fn, k->stream_arg);  // read at call time: graph capture sees it
    if (s == nullptr) return nullptr;
    void* stream = PyLong_AsVoidPtr(s);
    Py_DECREF(s);
    if (stream == nullptr && PyErr_Occurred()) return nullptr;
    // The driver copies the parameter values during the call, so they can live on this stack.
    uint64_t values[kMaxParams];
    void* params[kMaxParams];
    const size_t n_params = n_ptrs + plan->tail.size();
    if (n_params > kMaxParams) return call_fallback(k, inputs);
    for (size_t i = 0; i < n_ptrs; ++i) values[i] = reinterpret_cast<uint64_t>(ptrs[i]);
    for (size_t i = 0; i < plan->tail.size(); ++i) values[n_ptrs + i] = static_cast<uint64_t>(plan->tail[i]);
    for (size_t i = 0; i < n_params; ++i) params[i] = &values[i];
    const int rc = plan->launch(plan->fn, plan->grid[0], plan->grid[1], plan->grid[2], plan->block[0],
                                plan->block[1], plan->block[2], plan->shared_mem, stream, params, nullptr);
    // No current context on this thread, or a real error: the Python launcher makes torch's context current and
    // retries, or raises the driver's error with the kernel's name.
    if (rc != 0) return call_fallback(k, inputs);
  } else if (plan->kind != kNone) {
    Py_BEGIN_ALLOW_THREADS  // the C++ kernels may run long (OpenMP); the tensors are held by `inputs` and `outs`
    switch (plan->kind) {
      case kCpuFlat:
        reinterpret_cast<cpu_flat_fn>(plan->fn)(ptrs, plan->tail[0]);
        break;
      case kCpuStrided:
        reinterpret_cast<cpu_strided_fn>(plan->fn)(ptrs, plan->sizes.data(), plan->strides.data(), plan->tail[0]);
        break;
      case kCpuArgs:
        reinterpret_cast<cpu_args_fn>(plan->fn)(ptrs, plan->tail.data());
        break;
      default:
        break;
    }
    Py_END_ALLOW_THREADS
  }
  PyObject* result = PyList_New(static_cast<Py_ssize_t>(n_out));
  if (result == nullptr) return nullptr;
  for (size_t j = 0; j < n_out; ++j) PyList_SET_ITEM(result, j, THPVariable_Wrap(std::move(outs[j])));
  return result;
}

bool int_list(PyObject* seq, std::vector<int64_t>& out) {
  PyObject* fast = PySequence_Fast(seq, "expected a sequence of ints");
  if (fast == nullptr) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  out.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    out[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
    if (out[i] == -1 && PyErr_Occurred()) {
      Py_DECREF(fast);
      return false;
    }
  }
  Py_DECREF(fast);
  return true;
}

bool dim3(PyObject* seq, unsigned out[3]) {
  std::vector<int64_t> v;
  if (!int_list(seq, v)) return false;
  if (v.size() != 3) {
    PyErr_SetString(PyExc_ValueError, "grid and block need 3 dimensions");
    return false;
  }
  for (int i = 0; i < 3; ++i) out[i] = static_cast<unsigned>(v[i]);
  return true;
}

Kernel* kernel_of(PyObject* native) {
  if (!PyCFunction_Check(native)) {
    PyErr_SetString(PyExc_TypeError, "expected a call made by fxopt_native.kernel()");
    return nullptr;
  }
  return static_cast<Kernel*>(PyCapsule_GetPointer(PyCFunction_GET_SELF(native), kCapsule));
}

// kernel(name, fallback, n_inputs, output_dtypes, device, stream_fn, stream_arg, tensor_type, parameter_type)
//   -> call, a builtin named `name` in module fxopt.kernels
PyObject* make_kernel(PyObject*, PyObject* args) {
  PyObject *fallback, *dtypes, *device, *stream_fn, *stream_arg, *tensor_type, *param_type;
  const char* name;
  Py_ssize_t n_in;
  if (!PyArg_ParseTuple(args, "sOnOOOOOO", &name, &fallback, &n_in, &dtypes, &device, &stream_fn, &stream_arg,
                        &tensor_type, &param_type))
    return nullptr;
  if (!THPDevice_Check(device) || !PyType_Check(tensor_type) || !PyType_Check(param_type)) {
    PyErr_SetString(PyExc_TypeError, "kernel(): expected a torch.device and the tensor and parameter types");
    return nullptr;
  }
  auto k = std::make_unique<Kernel>();
  k->n_in = static_cast<size_t>(n_in);
  k->device = reinterpret_cast<THPDevice*>(device)->device;
  PyObject* fast = PySequence_Fast(dtypes, "output_dtypes must be a sequence");
  if (fast == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); ++i) {
    PyObject* d = PySequence_Fast_GET_ITEM(fast, i);
    if (!THPDtype_Check(d)) {
      Py_DECREF(fast);
      PyErr_SetString(PyExc_TypeError, "output_dtypes must hold torch.dtype objects");
      return nullptr;
    }
    k->out_dtypes.push_back(reinterpret_cast<THPDtype*>(d)->scalar_type);
  }
  Py_DECREF(fast);
  Py_INCREF(fallback), Py_INCREF(stream_fn), Py_INCREF(stream_arg), Py_INCREF(tensor_type), Py_INCREF(param_type);
  k->fallback = fallback, k->stream_fn = stream_fn, k->stream_arg = stream_arg;
  k->tensor_type = reinterpret_cast<PyTypeObject*>(tensor_type);
  k->param_type = reinterpret_cast<PyTypeObject*>(param_type);
  k->name = name;
  k->def = {k->name.c_str(), (PyCFunction)call, METH_O,
            "call(inputs) -> outputs: the kernel's compiled call path (fxopt/runtime/native.py)."};
  PyMethodDef* def = &k->def;
  PyObject* capsule = PyCapsule_New(k.get(), kCapsule, destroy);
  if (capsule == nullptr) return nullptr;
  k.release();
  PyObject* module = PyUnicode_FromString("fxopt.kernels");
  PyObject* fn = module == nullptr ? nullptr : PyCFunction_NewEx(def, capsule, module);
  Py_XDECREF(module);
  Py_DECREF(capsule);
  return fn;
}

// add_plan(call, key, out_sizes, out_strides, kind, fn, launch, grid, block, shared_mem, tail, sizes, strides)
// key: per input (sizes, strides, dtype, device index), flattened as the Python path's plan key.
PyObject* add_plan(PyObject*, PyObject* args) {
  PyObject *native, *key, *out_sizes, *out_strides, *grid, *block, *tail, *sizes, *strides;
  int kind;
  unsigned long long fn, launch;
  unsigned shared_mem;
  if (!PyArg_ParseTuple(args, "OOOOiKKOOIOOO", &native, &key, &out_sizes, &out_strides, &kind, &fn, &launch, &grid,
                        &block, &shared_mem, &tail, &sizes, &strides))
    return nullptr;
  Kernel* k = kernel_of(native);
  if (k == nullptr) return nullptr;
  if (kind < kNone || kind > kCpuArgs || (kind == kCuda && (fn == 0 || launch == 0)) ||
      (kind > kCuda && fn == 0)) {
    PyErr_SetString(PyExc_ValueError, "add_plan(): a launching plan needs its function (and cuLaunchKernel)");
    return nullptr;
  }
  auto plan = std::make_unique<Plan>();
  PyObject* fast = PySequence_Fast(key, "key must be a sequence");
  if (fast == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  if (n != static_cast<Py_ssize_t>(4 * k->n_in)) {
    Py_DECREF(fast);
    PyErr_SetString(PyExc_ValueError, "add_plan(): the key needs (sizes, strides, dtype, device index) per input");
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < n; i += 4) {
    InputKey in{{}, {}, at::ScalarType::Undefined, c10::Device(c10::kCPU)};
    PyObject* dtype = PySequence_Fast_GET_ITEM(fast, i + 2);
    const long index = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i + 3));
    if (!int_list(PySequence_Fast_GET_ITEM(fast, i), in.sizes) ||
        !int_list(PySequence_Fast_GET_ITEM(fast, i + 1), in.strides) || !THPDtype_Check(dtype) ||
        (index == -1 && PyErr_Occurred())) {
      Py_DECREF(fast);
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "add_plan(): bad key");
      return nullptr;
    }
    in.dtype = reinterpret_cast<THPDtype*>(dtype)->scalar_type;
    in.device = index < 0 ? c10::Device(c10::kCPU)
                          : c10::Device(k->device.type(), static_cast<c10::DeviceIndex>(index));
    plan->inputs.push_back(std::move(in));
  }
  Py_DECREF(fast);
  for (auto [seq, dst] : {std::pair{out_sizes, &plan->out_sizes}, std::pair{out_strides, &plan->out_strides}}) {
    PyObject* outer = PySequence_Fast(seq, "output sizes and strides must be sequences");
    if (outer == nullptr) return nullptr;
    for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(outer); ++j) {
      dst->emplace_back();
      if (!int_list(PySequence_Fast_GET_ITEM(outer, j), dst->back())) {
        Py_DECREF(outer);
        return nullptr;
      }
    }
    Py_DECREF(outer);
  }
  if (plan->out_sizes.size() != k->out_dtypes.size() || plan->out_strides.size() != k->out_dtypes.size()) {
    PyErr_SetString(PyExc_ValueError, "add_plan(): one size and one stride per output");
    return nullptr;
  }
  plan->kind = static_cast<Kind>(kind);
  plan->fn = reinterpret_cast<void*>(fn);
  plan->launch = reinterpret_cast<cu_launch_fn>(launch);
  plan->shared_mem = shared_mem;
  if (!dim3(grid, plan->grid) || !dim3(block, plan->block) || !int_list(tail, plan->tail) ||
      !int_list(sizes, plan->sizes) || !int_list(strides, plan->strides))
    return nullptr;
  if ((kind == kCpuFlat || kind == kCpuStrided) && plan->tail.size() != 1) {
    PyErr_SetString(PyExc_ValueError, "add_plan(): the C++ flat and strided paths take the element count as tail");
    return nullptr;
  }
  k->plans.push_back(std::move(plan));
  Py_RETURN_NONE;
}

PyObject* plan_count(PyObject*, PyObject* native) {
  Kernel* k = kernel_of(native);
  return k == nullptr ? nullptr : PyLong_FromSize_t(k->plans.size());
}

// -- CUDA-graph replays (fxopt/runtime/cudagraph/replay.py, NOTE [Native graph call]) ----------------------
//
// One `call(args, stream)` per captured signature whose graph holds its own input and output copies
// (fxopt/runtime/graph_io.py): point each input copy node at the caller's tensor, allocate each output and point
// the output copy node at it (cuGraphExecKernelNodeSetParams), then cuGraphLaunch on the caller's stream. The GIL
// stays held throughout, so no other thread repacks a node between its update and the launch. The Python closure
// that built it is the fallback for anything unexpected.

// CUDA_KERNEL_NODE_PARAMS_v2
struct KernelNodeParams {
  void* func;
  unsigned grid[3], block[3], shared_mem;
  void** kernel_params;
  void** extra;
  void* kern;
  void* ctx;
};
using cu_set_params_fn = int (*)(void*, void*, const KernelNodeParams*);
using cu_graph_launch_fn = int (*)(void*, void*);

// A copy node (fxopt_graph_copy(src, dst, nbytes)) and the storage its parameters point at.
struct CopyNode {
  void* node = nullptr;
  uint64_t values[3] = {0, 0, 0};  // src, dst, nbytes
  void* params[3] = {nullptr, nullptr, nullptr};
  KernelNodeParams np{};
};

struct GraphInput {
  Py_ssize_t position = 0;
  int64_t nbytes = 0;
  CopyNode copy;
};

struct GraphOutput {
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype = at::ScalarType::Undefined;
  CopyNode copy;
};

struct GraphCall {
  void* exec = nullptr;  // CUgraphExec, owned by the torch CUDAGraph the Python side keeps alive
  c10::Device device{c10::kCUDA};
  cu_set_params_fn set_params = nullptr;
  cu_graph_launch_fn launch = nullptr;
  std::vector<GraphInput> inputs;     // deque-like: never resized after construction (params point into them)
  std::vector<GraphOutput> outputs;
  int result_kind = 0;                // 0: one tensor, 1: a tuple, 2: `fixed` (no output copies: unsafe outputs)
  PyObject* fixed = nullptr;
  PyObject* keep = nullptr;           // the torch CUDAGraph whose execution `exec` is: alive as long as this call
  PyObject* fallback = nullptr;       // the Python replay closure: fallback(args)
  PyTypeObject* tensor_type = nullptr;
  PyTypeObject* param_type = nullptr;
  uint64_t launches = 0;
  std::string name;
  PyMethodDef def{};

  ~GraphCall() {
    Py_XDECREF(fixed);
    Py_XDECREF(keep);
    Py_XDECREF(fallback);
    Py_XDECREF((PyObject*)tensor_type);
    Py_XDECREF((PyObject*)param_type);
  }
};

constexpr const char* kGraphCapsule = "fxopt.native_graph_call";

void destroy_graph_call(PyObject* capsule) {
  delete static_cast<GraphCall*>(PyCapsule_GetPointer(capsule, kGraphCapsule));
}

void init_copy_node(CopyNode& c, void* node, void* func, unsigned grid, unsigned threads) {
  c.node = node;
  for (int i = 0; i < 3; ++i) c.params[i] = &c.values[i];
  c.np.func = func;
  c.np.grid[0] = grid, c.np.grid[1] = 1, c.np.grid[2] = 1;
  c.np.block[0] = threads, c.np.block[1] = 1, c.np.block[2] = 1;
  c.np.shared_mem = 0;
  c.np.kernel_params = c.params;
  c.np.extra = nullptr, c.np.kern = nullptr, c.np.ctx = nullptr;
}

PyObject* graph_fallback(GraphCall* g, PyObject* const* args, Py_ssize_t nargs) {
  return nargs >= 1 ? PyObject_CallOneArg(g->fallback, args[0]) : PyObject_CallNoArgs(g->fallback);
}

// call(args, stream) bound to one captured signature: `self` is its capsule.
PyObject* graph_call(PyObject* self, PyObject* const* argv, Py_ssize_t nargs) {
  auto* g = static_cast<GraphCall*>(PyCapsule_GetPointer(self, kGraphCapsule));
  if (g == nullptr) return nullptr;
  if (nargs != 2 || !PyTuple_CheckExact(argv[0])) return graph_fallback(g, argv, nargs);
  PyObject* args = argv[0];
  void* stream = PyLong_AsVoidPtr(argv[1]);
  if (stream == nullptr && PyErr_Occurred()) return nullptr;
  const Py_ssize_t n = PyTuple_GET_SIZE(args);
  for (auto& in : g->inputs) {
    if (in.position >= n) return graph_fallback(g, argv, 1);
    PyObject* item = PyTuple_GET_ITEM(args, in.position);
    PyTypeObject* type = Py_TYPE(item);
    if (type != g->tensor_type && type != g->param_type) return graph_fallback(g, argv, 1);
    const at::Tensor& t = THPVariable_Unpack(item);
    // The signature key already matched sizes, strides, dtype and device; this only keeps the copy in bounds.
    if (static_cast<int64_t>(t.numel()) * static_cast<int64_t>(t.element_size()) != in.nbytes)
      return graph_fallback(g, argv, 1);
    in.copy.values[0] = reinterpret_cast<uint64_t>(t.const_data_ptr());
    if (g->set_params(g->exec, in.copy.node, &in.copy.np) != 0) return graph_fallback(g, argv, 1);
  }
  std::vector<at::Tensor> outs;
  try {
    outs.reserve(g->outputs.size());
    for (auto& out : g->outputs) {
      outs.push_back(at::empty_strided(out.sizes, out.strides, at::TensorOptions().dtype(out.dtype).device(g->device)));
      out.copy.values[1] = reinterpret_cast<uint64_t>(outs.back().data_ptr());
      if (g->set_params(g->exec, out.copy.node, &out.copy.np) != 0) return graph_fallback(g, argv, 1);
    }
  } catch (...) {
    return graph_fallback(g, argv, 1);  // e.g. out of memory: the Python path raises torch's own error
  }
  if (g->launch(g->exec, stream) != 0) return graph_fallback(g, argv, 1);
  ++g->launches;
  if (g->result_kind == 2) {
    Py_INCREF(g->fixed);
    return g->fixed;
  }
  if (g->result_kind == 0 && outs.size() == 1) return THPVariable_Wrap(std::move(outs[0]));
  PyObject* result = PyTuple_New(static_cast<Py_ssize_t>(outs.size()));
  if (result == nullptr) return nullptr;
  for (size_t j = 0; j < outs.size(); ++j) PyTuple_SET_ITEM(result, j, THPVariable_Wrap(std::move(outs[j])));
  return result;
}

GraphCall* graph_call_of(PyObject* native) {
  if (!PyCFunction_Check(native)) {
    PyErr_SetString(PyExc_TypeError, "expected a call made by fxopt_native.graph_call()");
    return nullptr;
  }
  return static_cast<GraphCall*>(PyCapsule_GetPointer(PyCFunction_GET_SELF(native), kGraphCapsule));
}

// graph_call(name, fallback, device, tensor_type, parameter_type, set_params, graph_launch, exec, inputs, outputs,
//            result_kind, fixed, keep) -> call(args, stream)
//   inputs: per pointed input (position, node, func, grid, threads, dst, nbytes)
//   outputs: per output (node, func, grid, threads, src, nbytes, sizes, strides, dtype)
PyObject* make_graph_call(PyObject*, PyObject* args) {
  const char* name;
  PyObject *fallback, *device, *tensor_type, *param_type, *inputs, *outputs, *fixed, *keep;
  unsigned long long set_params, launch, exec;
  int result_kind;
  if (!PyArg_ParseTuple(args, "sOOOOKKKOOiOO", &name, &fallback, &device, &tensor_type, &param_type, &set_params,
                        &launch, &exec, &inputs, &outputs, &result_kind, &fixed, &keep))
    return nullptr;
  if (!THPDevice_Check(device) || !PyType_Check(tensor_type) || !PyType_Check(param_type) || set_params == 0 ||
      launch == 0 || exec == 0 || result_kind < 0 || result_kind > 2) {
    PyErr_SetString(PyExc_TypeError, "graph_call(): bad arguments");
    return nullptr;
  }
  auto g = std::make_unique<GraphCall>();
  g->device = reinterpret_cast<THPDevice*>(device)->device;
  g->set_params = reinterpret_cast<cu_set_params_fn>(set_params);
  g->launch = reinterpret_cast<cu_graph_launch_fn>(launch);
  g->exec = reinterpret_cast<void*>(exec);
  g->result_kind = result_kind;
  PyObject* ins = PySequence_Fast(inputs, "inputs must be a sequence");
  if (ins == nullptr) return nullptr;
  g->inputs.resize(PySequence_Fast_GET_SIZE(ins));
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(ins); ++i) {
    Py_ssize_t position;
    unsigned long long node, func, dst;
    unsigned grid, threads;
    long long nbytes;
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(ins, i), "nKKIIKL", &position, &node, &func, &grid, &threads,
                          &dst, &nbytes)) {
      Py_DECREF(ins);
      return nullptr;
    }
    auto& in = g->inputs[i];
    in.position = position, in.nbytes = nbytes;
    init_copy_node(in.copy, reinterpret_cast<void*>(node), reinterpret_cast<void*>(func), grid, threads);
    in.copy.values[1] = dst, in.copy.values[2] = static_cast<uint64_t>(nbytes);
  }
  Py_DECREF(ins);
  PyObject* outs = PySequence_Fast(outputs, "outputs must be a sequence");
  if (outs == nullptr) return nullptr;
  g->outputs.resize(PySequence_Fast_GET_SIZE(outs));
  for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(outs); ++j) {
    unsigned long long node, func, src;
    unsigned grid, threads;
    long long nbytes;
    PyObject *sizes, *strides, *dtype;
    auto& out = g->outputs[j];
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(outs, j), "KKIIKLOOO", &node, &func, &grid, &threads, &src,
                          &nbytes, &sizes, &strides, &dtype) ||
        !int_list(sizes, out.sizes) || !int_list(strides, out.strides)) {
      Py_DECREF(outs);
      return nullptr;
    }
    if (!THPDtype_Check(dtype)) {
      Py_DECREF(outs);
      PyErr_SetString(PyExc_TypeError, "graph_call(): an output's dtype must be a torch.dtype");
      return nullptr;
    }
    out.dtype = reinterpret_cast<THPDtype*>(dtype)->scalar_type;
    init_copy_node(out.copy, reinterpret_cast<void*>(node), reinterpret_cast<void*>(func), grid, threads);
    out.copy.values[0] = src, out.copy.values[2] = static_cast<uint64_t>(nbytes);
  }
  Py_DECREF(outs);
  if ((result_kind == 2) != g->outputs.empty() || (result_kind == 0 && g->outputs.size() != 1)) {
    PyErr_SetString(PyExc_ValueError, "graph_call(): result_kind does not fit the outputs");
    return nullptr;
  }
  Py_INCREF(fallback), Py_INCREF(tensor_type), Py_INCREF(param_type), Py_INCREF(fixed), Py_INCREF(keep);
  g->fallback = fallback, g->fixed = fixed, g->keep = keep;
  g->tensor_type = reinterpret_cast<PyTypeObject*>(tensor_type);
  g->param_type = reinterpret_cast<PyTypeObject*>(param_type);
  g->name = name;
  g->def = {g->name.c_str(), (PyCFunction)(void (*)())graph_call, METH_FASTCALL,
            "call(args, stream) -> outputs: one replay of a captured signature (fxopt/runtime/cudagraph/replay.py)."};
  PyMethodDef* def = &g->def;
  PyObject* capsule = PyCapsule_New(g.get(), kGraphCapsule, destroy_graph_call);
  if (capsule == nullptr) return nullptr;
  g.release();
  PyObject* module = PyUnicode_FromString("fxopt.graphs");
  PyObject* fn = module == nullptr ? nullptr : PyCFunction_NewEx(def, capsule, module);
  Py_XDECREF(module);
  Py_DECREF(capsule);
  return fn;
}

PyObject* graph_launches(PyObject*, PyObject* native) {
  GraphCall* g = graph_call_of(native);
  return g == nullptr ? nullptr : PyLong_FromUnsignedLongLong(g->launches);
}

// NOTE [Weight fingerprint]: what the optimized module was built from, in one number per call
// (fxopt/runtime/watch.py). Per tensor: its version counter (bumped by every in-place write), where its data lies
// (`.data =` swaps, `.to()`: a new dtype or device comes with new data) and requires_grad. About 10 ns a tensor on
// the CPUs measured (benchmarks/host_overhead.py): 0.1 us for a small MLP, 2-5 us for ResNet-18/50's 161/320.
inline void mix(uint64_t& h, uint64_t v) { h = (h ^ v) * 0x100000001b3ULL; }

PyObject* fingerprint(PyObject*, PyObject* tensors) {
  if (!PyTuple_Check(tensors)) {
    PyErr_SetString(PyExc_TypeError, "fingerprint(): expected a tuple of tensors");
    return nullptr;
  }
  uint64_t h = 0xcbf29ce484222325ULL;
  const Py_ssize_t n = PyTuple_GET_SIZE(tensors);
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyTuple_GET_ITEM(tensors, i);
      if (!THPVariable_Check(item)) {
        PyErr_SetString(PyExc_TypeError, "fingerprint(): expected a tuple of tensors");
        return nullptr;
      }
      c10::TensorImpl* impl = THPVariable_Unpack(item).unsafeGetTensorImpl();
      mix(h, impl->is_inference() ? 0 : static_cast<uint64_t>(impl->version_counter().current_version()));
      // storage().data(), not data(): a meta tensor has storage without memory, and data() throws for it
      const uint64_t data = impl->has_storage()
          ? reinterpret_cast<uint64_t>(impl->storage().data()) + static_cast<uint64_t>(impl->storage_offset()) : 0;
      mix(h, data ^ static_cast<uint64_t>(impl->requires_grad()));
    }
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  return PyLong_FromUnsignedLongLong(h);
}

PyMethodDef methods[] = {
    {"kernel", make_kernel, METH_VARARGS, "kernel(name, fallback, n_inputs, output_dtypes, device, stream_fn, "
                                          "stream_arg, tensor_type, parameter_type) -> call(inputs)"},
    {"add_plan", add_plan, METH_VARARGS, "add_plan(call, key, out_sizes, out_strides, kind, fn, launch, grid, "
                                         "block, shared_mem, tail, sizes, strides)"},
    {"plan_count", plan_count, METH_O, "plan_count(call) -> how many plans the call path knows"},
    {"graph_call", make_graph_call, METH_VARARGS, "graph_call(name, fallback, device, tensor_type, parameter_type, "
                                                  "set_params, graph_launch, exec, inputs, outputs, result_kind, "
                                                  "fixed, keep) -> call(args, stream)"},
    {"graph_launches", graph_launches, METH_O, "graph_launches(call) -> replays launched by the native call"},
    {"fingerprint", fingerprint, METH_O, "fingerprint(tensors) -> int: versions, data, dtypes, devices, "
                                         "requires_grad of a tuple of tensors (NOTE [Weight fingerprint])"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "fxopt_native", "fxopt's compiled call paths (kernels, graph replays)",
                          -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_fxopt_native() { return PyModule_Create(&module_def); }
