// edgetl bundle, C++ consumer on onnxruntime's C++ API: see bundle_io.hpp for usage.
#define ORT_API_MANUAL_INIT  // checked below: an onnxruntime library older than these headers says so
#include <onnxruntime_cxx_api.h>

#include <array>

#include "bundle_io.hpp"

#ifndef EDGETL_MODEL
#define EDGETL_MODEL "model.onnx"
#endif

// The C++ API needs the C API of its headers' version; a library older than that has none to give.
inline bool init_api() {
  const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    throw std::runtime_error(std::string("the onnxruntime library (") + OrtGetApiBase()->GetVersionString() +
                             ") is older than the headers this program was built with (C API " +
                             std::to_string(ORT_API_VERSION) + "); fix: build against the library's own headers");
  Ort::InitApi(api);
  return true;
}

class OrtModel : public edgetl::Model {
 public:
  explicit OrtModel(const std::string& bundle)
      : ready_(init_api()),
        env_(ORT_LOGGING_LEVEL_WARNING, "edgetl"),
        session_(env_, (bundle + "/" + EDGETL_MODEL).c_str(), Ort::SessionOptions{}) {
    Ort::TypeInfo type = session_.GetInputTypeInfo(0);
    auto info = type.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> shape = info.GetShape();  // [batch, height, width, 3]
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || shape.size() != 4 || shape[3] != 3)
      throw std::runtime_error(bundle + "/" EDGETL_MODEL ": the model does not take uint8 NHWC pixels "
                               "(a profile with model_input = \"float32-nchw\"?)");
    height_ = shape[1];
    width_ = shape[2];
    Ort::AllocatorWithDefaultOptions allocator;
    input_ = session_.GetInputNameAllocated(0, allocator).get();
    output_ = session_.GetOutputNameAllocated(0, allocator).get();
  }

  int height() const override { return static_cast<int>(height_); }
  int width() const override { return static_cast<int>(width_); }

  std::vector<float> logits(const edgetl::Image& image) override {
    const std::array<int64_t, 4> shape{1, height_, width_, 3};
    Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    Ort::Value x = Ort::Value::CreateTensor<uint8_t>(memory, const_cast<uint8_t*>(image.rgb.data()), image.rgb.size(),
                                                     shape.data(), shape.size());
    const char* inputs[] = {input_.c_str()};
    const char* outputs[] = {output_.c_str()};
    std::vector<Ort::Value> y = session_.Run(Ort::RunOptions{nullptr}, inputs, &x, 1, outputs, 1);
    const float* p = y[0].GetTensorData<float>();
    return {p, p + y[0].GetTensorTypeAndShapeInfo().GetElementCount()};
  }

 private:
  bool ready_;
  Ort::Env env_;
  Ort::Session session_;
  std::string input_, output_;
  int64_t height_ = 0, width_ = 0;
};

int main(int argc, char** argv) {
  return edgetl::run(argc, argv, [](const std::string& bundle) { return std::make_unique<OrtModel>(bundle); });
}
