// edgetl bundle, C++ consumer: what every runtime's main.cpp shares (no library beyond the C++17
// standard one). The model takes uint8 RGB pixels, NHWC, at its input size: normalisation is inside
// the model. Resizing and cropping are the application's (preprocess.json says how the model was
// trained: shorter side to resize_size, centre crop input_size).
//
//   <program> BUNDLE_DIR IMAGE.ppm   top-5 labels and probabilities of one image (binary PPM, P6,
//                                    exactly the model's input size)
//   <program> BUNDLE_DIR --golden    the bundle's golden inputs (golden/golden.txt): exit 1 when a
//                                    top-1 differs from the one recorded at build time
// Exit codes: 0 done, 1 a golden top-1 differs, 2 bad usage or input (one line on stderr).
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace edgetl {

struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // height x width x 3, row-major (HWC)
};

class Model {
 public:
  virtual ~Model() = default;
  virtual int height() const = 0;
  virtual int width() const = 0;
  virtual std::vector<float> logits(const Image& image) = 0;  // one image (batch 1)
};

// The next PPM header token; '#' comments skipped; consumes the one whitespace after it.
inline std::string ppm_token(std::istream& in) {
  std::string token;
  char c;
  while (in.get(c)) {
    if (c == '#') {
      std::string comment;
      std::getline(in, comment);
    } else if (!std::isspace(static_cast<unsigned char>(c))) {
      token += c;
      break;
    }
  }
  while (in.get(c) && !std::isspace(static_cast<unsigned char>(c))) token += c;
  return token;
}

inline int ppm_int(std::istream& in, const std::string& path, const char* what) {
  const std::string token = ppm_token(in);
  if (token.empty() || token.size() > 9 || !std::all_of(token.begin(), token.end(), [](char c) {
        return std::isdigit(static_cast<unsigned char>(c));
      }))
    throw std::runtime_error(path + ": bad PPM header (" + what + " '" + token + "')");
  return std::stoi(token);
}

// A binary PPM of exactly width x height (checked before its pixels are read).
inline Image read_ppm(const std::string& path, int width, int height) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  if (ppm_token(in) != "P6")
    throw std::runtime_error(path + ": not a binary PPM (P6); fix: convert it, e.g. with Pillow's "
                             "Image.save('x.ppm') or ImageMagick's `convert`");
  Image image;
  image.width = ppm_int(in, path, "width");
  image.height = ppm_int(in, path, "height");
  if (ppm_int(in, path, "maxval") != 255) throw std::runtime_error(path + ": only 8-bit PPM (maxval 255)");
  if (image.width != width || image.height != height)
    throw std::runtime_error(path + ": " + std::to_string(image.width) + "x" + std::to_string(image.height) +
                             " pixels, the model takes " + std::to_string(width) + "x" + std::to_string(height) +
                             "; fix: resize and centre-crop as preprocess.json says");
  image.rgb.resize(static_cast<size_t>(width) * height * 3);
  in.read(reinterpret_cast<char*>(image.rgb.data()), static_cast<std::streamsize>(image.rgb.size()));
  if (in.gcount() != static_cast<std::streamsize>(image.rgb.size())) throw std::runtime_error(path + ": truncated");
  return image;
}

inline std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) lines.push_back(line);
  return lines;
}

inline int argmax(const std::vector<float>& v) {
  return static_cast<int>(std::max_element(v.begin(), v.end()) - v.begin());
}

inline std::vector<float> softmax(const std::vector<float>& z) {
  const float top = *std::max_element(z.begin(), z.end());
  std::vector<float> p(z.size());
  std::transform(z.begin(), z.end(), p.begin(), [top](float v) { return std::exp(v - top); });
  const float sum = std::accumulate(p.begin(), p.end(), 0.0f);
  for (float& v : p) v /= sum;
  return p;
}

inline std::string label_of(const std::vector<std::string>& labels, int i) {
  return i >= 0 && i < static_cast<int>(labels.size()) ? labels[i] : "#" + std::to_string(i);
}

// golden/golden.txt: one "<file> <expected top-1 index>" per line (the file name has no spaces).
inline int golden(Model& model, const std::string& bundle, const std::vector<std::string>& labels) {
  const std::string list = bundle + "/golden/golden.txt";
  int n = 0, bad = 0;
  for (const std::string& line : read_lines(list)) {
    const size_t space = line.rfind(' ');
    int expected = -1;
    try {
      if (space == std::string::npos) throw std::invalid_argument(line);
      expected = std::stoi(line.substr(space + 1));
    } catch (const std::exception&) {
      throw std::runtime_error(list + ": bad line '" + line + "' (expected '<file> <index>')");
    }
    const std::string file = line.substr(0, space);
    Image image = read_ppm(bundle + "/" + file, model.width(), model.height());
    const int got = argmax(model.logits(image));
    ++n;
    if (got != expected) {
      ++bad;
      std::cout << "MISMATCH " << file << ": expected " << label_of(labels, expected) << ", got "
                << label_of(labels, got) << "\n";
    } else {
      std::cout << "ok " << file << ": " << label_of(labels, got) << "\n";
    }
  }
  if (n == 0) throw std::runtime_error(list + ": no golden inputs listed");
  std::cout << "golden self-test " << (bad ? "FAILED" : "passed") << ": " << n - bad << " of " << n
            << " top-1 as recorded at build time\n";
  return bad ? 1 : 0;
}

inline int classify(Model& model, const std::string& path, const std::vector<std::string>& labels) {
  Image image = read_ppm(path, model.width(), model.height());
  const std::vector<float> p = softmax(model.logits(image));
  std::vector<int> order(p.size());
  std::iota(order.begin(), order.end(), 0);
  const size_t k = std::min<size_t>(5, order.size());
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&p](int a, int b) { return p[a] > p[b]; });
  for (size_t i = 0; i < k; ++i) std::cout << label_of(labels, order[i]) << "\t" << p[order[i]] << "\n";
  return 0;
}

// argv: BUNDLE_DIR (IMAGE.ppm | --golden); `load` makes the runtime's model from the bundle folder.
inline int run(int argc, char** argv, const std::function<std::unique_ptr<Model>(const std::string&)>& load) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " BUNDLE_DIR IMAGE.ppm | " << argv[0] << " BUNDLE_DIR --golden\n";
    return 2;
  }
  try {
    const std::string bundle = argv[1], what = argv[2];
    std::unique_ptr<Model> model = load(bundle);
    const std::vector<std::string> labels = read_lines(bundle + "/labels.txt");
    return what == "--golden" ? golden(*model, bundle, labels) : classify(*model, what, labels);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
}

}  // namespace edgetl
