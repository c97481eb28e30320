// benchmarks/arm64_golden.py's logit probe, compiled for aarch64 against one runtime: the model's raw
// logits on binary PPMs, one line per file (its path, then the logits). -DEDGETL_PROBE_OPENVINO: OpenVINO's
// C++ API (CPU device, as the bundle's consumer); otherwise onnxruntime's.
//   arm64_probe MODEL IMAGE.ppm...
#include <array>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>
static bool read_ppm(const char* path, int64_t& w, int64_t& h, std::vector<uint8_t>& rgb) {
  std::ifstream f(path, std::ios::binary);
  std::string magic;
  int maxval = 0;
  f >> magic >> w >> h >> maxval;
  f.get();
  rgb.resize(static_cast<size_t>(w * h * 3));
  f.read(reinterpret_cast<char*>(rgb.data()), static_cast<std::streamsize>(rgb.size()));
  if (!f || magic != "P6" || maxval != 255) std::fprintf(stderr, "%s: not a plain P6 PPM\n", path);
  return f && magic == "P6" && maxval == 255;
}
static void print(const char* path, const float* p, size_t n) {
  std::printf("%s", path);
  for (size_t k = 0; k < n; ++k) std::printf(" %.9g", p[k]);
  std::printf("\n");
}

#ifdef EDGETL_PROBE_OPENVINO
#include <openvino/openvino.hpp>
int main(int argc, char** argv) {  // MODEL.xml IMAGE.ppm... (CPU device, as the bundle's consumer)
  ov::Core core;  // $EDGETL_PROBE_PRECISION: an inference_precision hint (f32, f16); default: the plugin's
  ov::AnyMap config;
  if (const char* p = std::getenv("EDGETL_PROBE_PRECISION")) config[ov::hint::inference_precision.name()] = p;
  ov::InferRequest request = core.compile_model(argv[1], "CPU", config).create_infer_request();
  for (int i = 2; i < argc; ++i) {
    int64_t w = 0, h = 0;
    std::vector<uint8_t> rgb;
    if (!read_ppm(argv[i], w, h, rgb)) return 2;
    request.set_input_tensor(ov::Tensor(ov::element::u8, ov::Shape{1, size_t(h), size_t(w), 3}, rgb.data()));
    request.infer();
    const ov::Tensor y = request.get_output_tensor();
    print(argv[i], y.data<const float>(), y.get_size());
  }
  return 0;
}
#else
#include <onnxruntime_cxx_api.h>
int main(int argc, char** argv) {  // MODEL.onnx IMAGE.ppm...
  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "arm64_golden");
  Ort::SessionOptions options;  // $EDGETL_PROBE_OPT: graph optimisation level 0, 1, 2 or 99 (default 99: all)
  if (const char* level = std::getenv("EDGETL_PROBE_OPT"))
    options.SetGraphOptimizationLevel(GraphOptimizationLevel(std::atoi(level)));
  Ort::Session session(env, argv[1], options);
  Ort::AllocatorWithDefaultOptions alloc;
  const std::string in = session.GetInputNameAllocated(0, alloc).get();
  const std::string out = session.GetOutputNameAllocated(0, alloc).get();
  const char* ins[] = {in.c_str()};
  const char* outs[] = {out.c_str()};
  Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  for (int i = 2; i < argc; ++i) {
    int64_t w = 0, h = 0;
    std::vector<uint8_t> rgb;
    if (!read_ppm(argv[i], w, h, rgb)) return 2;
    const std::array<int64_t, 4> shape{1, h, w, 3};
    Ort::Value x = Ort::Value::CreateTensor<uint8_t>(mem, rgb.data(), rgb.size(), shape.data(), shape.size());
    std::vector<Ort::Value> y = session.Run(Ort::RunOptions{nullptr}, ins, &x, 1, outs, 1);
    print(argv[i], y[0].GetTensorData<float>(), y[0].GetTensorTypeAndShapeInfo().GetElementCount());
  }
  return 0;
}
#endif
