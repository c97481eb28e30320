// edgetl bundle, C++ consumer on OpenVINO's C++ API: see bundle_io.hpp for usage. runtime.json's
// settings as predict.py's engine_openvino.py reads them: device (EDGETL_DEVICE overrides it),
// performance_hint, config (extra properties); on the CPU, INFERENCE_PRECISION_HINT f32 unless config
// sets it. The IR (.xml + .bin) is read once, checked against manifest.json, and compiled from memory.
#include <cstdlib>
#include <openvino/openvino.hpp>

#include "bundle_io.hpp"

std::string as_text(const edgetl::Json& v) {
  if (v.kind == edgetl::Json::String) return v.text;
  if (v.kind == edgetl::Json::Bool) return v.boolean ? "YES" : "NO";
  if (v.kind == edgetl::Json::Number) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.17g", v.number);
    return buf;
  }
  throw edgetl::InputError("runtime.json: a setting that is not a string, number or boolean");
}

class OpenVinoModel : public edgetl::Model {
 public:
  OpenVinoModel(const edgetl::Bundle& bundle, const edgetl::ModelSpec& spec, const edgetl::Contract& contract) {
    const std::string xml = bundle.read(spec.file);  // sha256 checked, as the weights below
    const std::string bin_name = spec.file.substr(0, spec.file.rfind('.')) + ".bin";
    const std::string bin = bundle.read(bin_name);
    ov::Tensor weights(ov::element::u8, ov::Shape{bin.size()});
    std::memcpy(weights.data(), bin.data(), bin.size());
    std::shared_ptr<ov::Model> model = core_.read_model(xml, weights);
    const ov::Output<ov::Node> input = model->input();
    const ov::PartialShape shape = input.get_partial_shape();  // [batch, height, width, 3]
    if (input.get_element_type() != ov::element::u8 || shape.rank().is_dynamic() || shape.rank().get_length() != 4 ||
        !shape[1].is_static() || !shape[2].is_static() || !shape[3].is_static() || shape[3].get_length() != 3 ||
        shape[1].get_length() != contract.height || shape[2].get_length() != contract.width)
      throw edgetl::InputError(bundle.path(spec.file) + ": the model does not take uint8 NHWC pixels of preprocess.json's "
                               "input_size (an input [batch, height, width, 3] of fixed height and width)");
    height_ = shape[1].get_length();
    width_ = shape[2].get_length();
    model->reshape(ov::PartialShape{1, height_, width_, 3});  // batch 1: a static shape compiles faster code

    const edgetl::Json* dev = edgetl::setting(spec.settings, "device");
    device_ = dev && dev->kind == edgetl::Json::String ? dev->text : "CPU";
    if (const char* env = std::getenv("EDGETL_DEVICE"); env && *env) device_ = env;
    const edgetl::Json* hint = edgetl::setting(spec.settings, "performance_hint");
    ov::AnyMap config{{"PERFORMANCE_HINT", hint ? as_text(*hint) : std::string("LATENCY")}};
    if (const edgetl::Json* extra = edgetl::setting(spec.settings, "config"); extra && extra->kind == edgetl::Json::Object)
      for (const auto& m : extra->members) config[m.first] = as_text(m.second);
    if (device_ == "CPU" && !config.count("INFERENCE_PRECISION_HINT")) config["INFERENCE_PRECISION_HINT"] = "f32";
    ov::CompiledModel compiled;
    try {
      compiled = core_.compile_model(model, device_, config);
    } catch (const std::exception& e) {
      const std::vector<std::string> have = core_.get_available_devices();
      const std::string base = device_.substr(0, device_.find('.'));
      bool present = device_.rfind("AUTO", 0) == 0 || device_.rfind("HETERO", 0) == 0 || device_.rfind("MULTI", 0) == 0;
      for (const std::string& d : have) present = present || d == device_ || d.rfind(base, 0) == 0;
      std::string list;
      for (const std::string& d : have) list += (list.empty() ? "" : ", ") + d;
      if (!present)
        throw edgetl::InputError("OpenVINO device '" + device_ + "' is not available here (available: " + list +
                                 "); fix: EDGETL_DEVICE=CPU, or install the device's driver");
      throw edgetl::InputError("OpenVINO could not compile the model for '" + device_ + "': " + edgetl::first_line(e.what()));
    }
    request_ = compiled.create_infer_request();
  }

  std::string executed_by() const override {
    return std::string("OpenVINO ") + ov::get_openvino_version().buildNumber + " " + device_;
  }

  std::vector<float> logits(const edgetl::Image& image) override {
    ov::Tensor x(ov::element::u8, ov::Shape{1, static_cast<size_t>(height_), static_cast<size_t>(width_), 3},
                 const_cast<uint8_t*>(image.rgb.data()));
    request_.set_input_tensor(x);
    request_.infer();
    const ov::Tensor y = request_.get_output_tensor();
    const float* p = y.data<const float>();
    return {p, p + y.get_size()};
  }

 private:
  ov::Core core_;
  ov::InferRequest request_;
  std::string device_;
  int64_t height_ = 0, width_ = 0;
};

int main(int argc, char** argv) {
  return edgetl::run(argc, argv, [](const edgetl::Bundle& bundle, const edgetl::ModelSpec& spec,
                                    const edgetl::Contract& contract) {
    return std::make_unique<OpenVinoModel>(bundle, spec, contract);
  });
}
