// edgetl bundle, C++ consumer on onnxruntime's C++ API: see bundle_io.hpp for usage. The model file
// is read once, checked against manifest.json, and the session made from those very bytes.
#define ORT_API_MANUAL_INIT  // checked below: an onnxruntime library older than these headers says so
#include <onnxruntime_cxx_api.h>

#include <array>

#include "bundle_io.hpp"

// The C++ API needs the C API of its headers' version; a library older than that has none to give.
inline bool init_api() {
  const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    throw std::runtime_error(std::string("the onnxruntime library (") + OrtGetApiBase()->GetVersionString() +
                             ") is older than the headers this program was built with (C API " +
                             std::to_string(ORT_API_VERSION) + "); fix: use onnxruntime " + std::to_string(ORT_API_VERSION) +
                             " or newer (or build against the library's own headers)");
  Ort::InitApi(api);
  return true;
}

Ort::SessionOptions options(const edgetl::Json& settings) {
  Ort::SessionOptions opts;
  if (const edgetl::Json* t = edgetl::setting(settings, "threads"); t && t->kind == edgetl::Json::Number && t->number > 0)
    opts.SetIntraOpNumThreads(static_cast<int>(t->number));
  const edgetl::Json* spin = edgetl::setting(settings, "spinning");
  if (spin && ((spin->kind == edgetl::Json::Bool && !spin->boolean) ||
               (spin->kind == edgetl::Json::String && (spin->text == "false" || spin->text == "0")))) {
    opts.AddConfigEntry("session.intra_op.allow_spinning", "0");
    opts.AddConfigEntry("session.inter_op.allow_spinning", "0");
  }
  return opts;
}

class OrtModel : public edgetl::Model {
 public:
  OrtModel(const edgetl::Bundle& bundle, const edgetl::ModelSpec& spec, const edgetl::Contract& contract)
      : ready_(init_api()),
        env_(ORT_LOGGING_LEVEL_ERROR, "edgetl"),
        bytes_(bundle.read(spec.file)),  // sha256 checked before onnxruntime sees a byte
        session_(env_, bytes_.data(), bytes_.size(), options(spec.settings)) {
    bytes_.clear();
    bytes_.shrink_to_fit();
    Ort::TypeInfo type = session_.GetInputTypeInfo(0);
    auto info = type.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> shape = info.GetShape();  // [batch, height, width, 3]
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || shape.size() != 4 || shape[3] != 3 ||
        shape[1] != contract.height || shape[2] != contract.width)
      throw edgetl::InputError(bundle.path(spec.file) + ": the model does not take uint8 NHWC pixels of preprocess.json's "
                               "input_size");
    height_ = shape[1];
    width_ = shape[2];
    Ort::AllocatorWithDefaultOptions allocator;
    input_ = session_.GetInputNameAllocated(0, allocator).get();
    output_ = session_.GetOutputNameAllocated(0, allocator).get();
  }

  std::string executed_by() const override {
    return std::string("onnxruntime ") + OrtGetApiBase()->GetVersionString() + " CPUExecutionProvider";
  }

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
  std::string bytes_;
  Ort::Session session_;
  std::string input_, output_;
  int64_t height_ = 0, width_ = 0;
};

int main(int argc, char** argv) {
  return edgetl::run(argc, argv, [](const edgetl::Bundle& bundle, const edgetl::ModelSpec& spec,
                                    const edgetl::Contract& contract) {
    return std::make_unique<OrtModel>(bundle, spec, contract);
  });
}
