// edgetl bundle, C++ consumer on OpenVINO's C++ API: see bundle_io.hpp for usage. The device is CPU
// unless the environment variable EDGETL_DEVICE names another (GPU, NPU, AUTO, ...).
#include <cstdlib>
#include <openvino/openvino.hpp>

#include "bundle_io.hpp"

#ifndef EDGETL_MODEL
#define EDGETL_MODEL "model.xml"
#endif

class OpenVinoModel : public edgetl::Model {
 public:
  explicit OpenVinoModel(const std::string& bundle) {
    std::shared_ptr<ov::Model> model = core_.read_model(bundle + "/" + EDGETL_MODEL);
    const ov::Output<ov::Node> input = model->input();
    const ov::PartialShape shape = input.get_partial_shape();  // [batch, height, width, 3]
    if (input.get_element_type() != ov::element::u8 || shape.rank().get_length() != 4 || shape[3].get_length() != 3)
      throw std::runtime_error(bundle + "/" EDGETL_MODEL ": the model does not take uint8 NHWC pixels "
                               "(a profile with model_input = \"float32-nchw\"?)");
    height_ = shape[1].get_length();
    width_ = shape[2].get_length();
    model->reshape(ov::PartialShape{1, height_, width_, 3});  // batch 1: a static shape compiles faster code
    const char* device = std::getenv("EDGETL_DEVICE");
    request_ = core_.compile_model(model, device ? device : "CPU").create_infer_request();
  }

  int height() const override { return static_cast<int>(height_); }
  int width() const override { return static_cast<int>(width_); }

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
  int64_t height_ = 0, width_ = 0;
};

int main(int argc, char** argv) {
  return edgetl::run(argc, argv, [](const std::string& bundle) { return std::make_unique<OpenVinoModel>(bundle); });
}
