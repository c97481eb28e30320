// edgetl bundle, C++ consumer: what every runtime's main.cpp shares (the C++17 standard library,
// and stb_image for PNG). The model takes uint8 RGB pixels, NHWC, at its input size (normalisation is
// inside the model); this program decodes the image and applies preprocess.json's resize and crop
// itself, bit for bit as the bundle's predict.py (image_io.hpp says how).
//
//   edgetl_classify BUNDLE_DIR IMAGE...       per image: "<file>\t<label>\t<probability>" (PNG or P6 PPM,
//                                             any size); --probs: every class's probability instead
//   edgetl_classify BUNDLE_DIR --golden       the golden inputs (golden/golden.txt): exit 1 when a top-1
//                                             differs from the build's, or a logit by more than
//                                             golden/expected.json's logit_atol (what predict.py --selftest checks)
//   edgetl_classify BUNDLE_DIR --bench N      N timed runs at batch 1 (random pixels): p50/p90 latency
//   --no-verify                               skip the sha256 checks against manifest.json
// manifest.json's own digest is checked (as integrity.py takes it), then every file read from the
// bundle (the model first, before it is loaded) against its sha256: refused (exit 1) when it differs
// or is not listed. Files added to the bundle are not looked for (predict.py does). runtime.json's default
// model and settings are honoured (onnxruntime: threads, spinning; OpenVINO: device, performance_hint,
// config); EDGETL_DEVICE overrides the OpenVINO device. Exit codes: 0 done, 1 a golden check failed or
// the bundle differs from its manifest, 2 bad usage or input, a folder without manifest.json included
// (one line on stderr).
#pragma once

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <iostream>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bundle_json.hpp"
#include "image_io.hpp"

namespace edgetl {

// The bundle differs from its manifest (exit 1, as predict.py).
struct IntegrityError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Refuses absolute paths, '..', empty components and backslashes: a bundle-relative name stays inside.
inline void check_relative(const std::string& rel, const std::string& where) {
  bool ok = !rel.empty() && rel[0] != '/' && rel.find('\\') == std::string::npos && rel.find('\0') == std::string::npos;
  for (size_t start = 0; ok && start <= rel.size();) {
    const size_t end = std::min(rel.find('/', start), rel.size());
    const std::string part = rel.substr(start, end - start);
    ok = !part.empty() && part != "." && part != "..";
    start = end + 1;
  }
  if (!ok) throw InputError(where + ": path '" + printable(rel) + "' leaves the bundle or is not a plain relative path");
}

// Strict non-negative integer below `limit` (no sign, no spaces, no trailing characters).
inline int parse_index(const std::string& text, int limit, const std::string& where) {
  const bool digits = !text.empty() && text.size() <= 9 &&
                      std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
  if (!digits || std::stoi(text) >= limit)
    throw InputError(where + ": index '" + printable(text) + "' is not a class index 0.." + std::to_string(limit - 1));
  return std::stoi(text);
}

class Bundle {
 public:
  Bundle(std::string dir, bool verify) : dir_(std::move(dir)), verify_(verify) {
    while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
    const std::string path = dir_ + "/manifest.json";
    std::error_code ec;
    if (!std::filesystem::is_directory(dir_, ec) || (verify_ && !std::filesystem::exists(path, ec)))
      throw InputError("not a bundle folder (no manifest.json): " + dir_);  // a mistyped path, exit 2
    try {
      manifest_ = parse_json(read_file(path));
    } catch (const InputError&) {
      if (!verify_) return;
      throw IntegrityError(path + ": unreadable; fix: rebuild the bundle (or pass --no-verify)");
    } catch (const std::runtime_error& e) {
      if (!verify_) return;
      throw IntegrityError(path + ": " + e.what() + "; fix: rebuild the bundle");
    }
    if (!verify_) return;
    if (manifest_.get("files") == nullptr || manifest_.get("files")->kind != Json::Object)
      throw IntegrityError(path + ": has no 'files' table; fix: rebuild the bundle");
    // Its own digest, as integrity.py takes it: sha256 of the canonical body, every key but "digest".
    const Json* digest = manifest_.get("digest");
    if (digest == nullptr || digest->kind != Json::String)
      throw IntegrityError(path + ": not sealed (no digest: made by an older edgetl, or edited); fix: rebuild the bundle");
    Json body = manifest_;
    body.members.erase(std::remove_if(body.members.begin(), body.members.end(),
                                      [](const auto& m) { return m.first == "digest"; }),
                       body.members.end());
    std::string text;
    canonical(body, text);
    if (digest->text != "sha256:" + sha256_hex(text))
      throw IntegrityError(path + ": changed since the build (its digest does not match its content); fix: restore or "
                           "rebuild the bundle (or pass --no-verify)");
  }

  const std::string& dir() const { return dir_; }

  // The major version of the Pillow that made the bundle (manifest.json "versions"), 13 if unknown.
  int pillow_major() const {
    const Json* v = manifest_.get("versions");
    const Json* p = v ? v->get("pillow") : nullptr;
    if (p == nullptr || p->kind != Json::String || p->text.empty() || !std::isdigit(static_cast<unsigned char>(p->text[0])))
      return 13;
    return std::atoi(p->text.substr(0, 4).c_str());  // at most 4 digits: atoi cannot overflow
  }
  std::string path(const std::string& rel) const { return dir_ + "/" + rel; }

  // The file's bytes, once they match manifest.json's sha256 (unless --no-verify).
  std::string read(const std::string& rel) const {
    check_relative(rel, dir_);
    std::string data = read_file(path(rel));
    if (verify_) {
      const Json* want = manifest_.get("files")->get(rel);
      if (want == nullptr || want->kind != Json::String)
        throw IntegrityError(path(rel) + ": not listed in manifest.json; fix: restore the bundle (or pass --no-verify)");
      if (want->text != sha256_hex(data))
        throw IntegrityError(path(rel) + ": changed since the build (its sha256 differs from manifest.json); fix: "
                             "restore or rebuild the bundle (or pass --no-verify)");
    }
    return data;
  }

  Json json(const std::string& rel) const {
    try {
      return parse_json(read(rel));
    } catch (const std::runtime_error& e) {
      if (dynamic_cast<const IntegrityError*>(&e) || dynamic_cast<const InputError*>(&e)) throw;
      throw InputError(path(rel) + ": " + e.what());
    }
  }

 private:
  std::string dir_;
  bool verify_;
  Json manifest_;
};

inline const Json& member(const Json& obj, const std::string& key, Json::Kind kind, const std::string& where) {
  const Json* v = obj.get(key);
  if (v == nullptr || v->kind != kind) throw InputError(where + ": no valid '" + key + "'");
  return *v;
}

// What the runtime needs to load the model: runtime.json's default model and its settings.
struct ModelSpec {
  std::string name, file;            // e.g. "int8", "model.onnx"
  Json settings;                      // runtime.json "settings" + "model_settings"[name]
};

inline ModelSpec model_spec(const Bundle& bundle) {
  const std::string where = bundle.path("runtime.json");
  const Json runtime = bundle.json("runtime.json");
  ModelSpec spec;
  spec.name = member(runtime, "default_model", Json::String, where).text;
  spec.file = member(member(runtime, "models", Json::Object, where), spec.name, Json::String, where).text;
  spec.settings.kind = Json::Object;
  if (const Json* s = runtime.get("settings"); s && s->kind == Json::Object) spec.settings.members = s->members;
  if (const Json* ms = runtime.get("model_settings"); ms && ms->get(spec.name))
    for (const auto& m : ms->get(spec.name)->members) spec.settings.members.emplace_back(m);
  return spec;
}

// The setting's last value (model_settings come after settings), or null.
inline const Json* setting(const Json& settings, const std::string& key) {
  const Json* found = nullptr;
  for (const auto& m : settings.members)
    if (m.first == key) found = &m.second;
  return found;
}

class Model {
 public:
  virtual ~Model() = default;
  virtual std::vector<float> logits(const Image& image) = 0;  // one image at the input size (batch 1)
  virtual std::string executed_by() const = 0;
};

struct Session {
  Bundle bundle;
  Contract contract;
  std::vector<std::string> labels;
};

inline Contract read_contract(const Bundle& bundle) {
  const std::string where = bundle.path("preprocess.json");
  const Json c = bundle.json("preprocess.json");
  const Json* dtype = c.get("dtype");
  if (dtype == nullptr || dtype->kind != Json::String || dtype->text != "uint8")
    throw InputError(where + ": the model does not take uint8 pixels (a profile with model_input = \"float32-nchw\"?); "
                     "this consumer feeds pixels");
  const Json& size = member(c, "input_size", Json::Array, where);
  if (size.items.size() != 2 || size.items[0].kind != Json::Number || size.items[1].kind != Json::Number)
    throw InputError(where + ": input_size is not [height, width]");
  const auto side = [&where](const Json& v) {  // the double's range first: a cast beyond int's is undefined
    if (!(v.number >= 1 && v.number <= 8192)) throw InputError(where + ": input_size / resize_size out of range");
    return static_cast<int>(v.number);
  };
  Contract out;
  out.height = side(size.items[0]);
  out.width = side(size.items[1]);
  out.resize_size = side(member(c, "resize_size", Json::Number, where));
  const Json* interp = c.get("interpolation");
  out.filter = filter_named(interp && interp->kind == Json::String ? interp->text : "bilinear", where);
  out.pillow_major = bundle.pillow_major();
  return out;
}

inline std::vector<std::string> read_labels(const Bundle& bundle) {
  const std::string text = bundle.read("labels.txt");
  std::vector<std::string> labels;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    labels.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  if (labels.empty()) throw InputError(bundle.path("labels.txt") + ": no labels");
  return labels;
}

inline std::vector<float> softmax(const std::vector<float>& z) {
  const double top = *std::max_element(z.begin(), z.end());
  std::vector<double> e(z.size());
  double sum = 0;
  for (size_t i = 0; i < z.size(); ++i) sum += e[i] = std::exp(static_cast<double>(z[i]) - top);
  std::vector<float> p(z.size());
  for (size_t i = 0; i < z.size(); ++i) p[i] = static_cast<float>(e[i] / sum);
  return p;
}

inline int argmax(const std::vector<float>& v) { return static_cast<int>(std::max_element(v.begin(), v.end()) - v.begin()); }

inline std::vector<float> checked_logits(Model& model, const Image& x, size_t n_classes) {
  std::vector<float> z = model.logits(x);
  if (z.size() != n_classes)
    throw InputError("the model gives " + std::to_string(z.size()) + " outputs, labels.txt lists " +
                     std::to_string(n_classes) + " classes");
  return z;
}

// golden/golden.txt ("<file> <index>" per line) with golden/expected.json's logits and logit_atol.
inline int golden(Model& model, const Session& s, const std::string& model_name) {
  const std::string list = s.bundle.path("golden/golden.txt");
  const std::string expected_path = s.bundle.path("golden/expected.json");
  const Json spec = s.bundle.json("golden/expected.json");
  const Json* models = spec.get("models");
  const Json& expected = models ? member(*models, model_name, Json::Object, expected_path) : spec;
  const double atol = member(expected, "logit_atol", Json::Number, expected_path).number;
  const Json& items = member(expected, "items", Json::Array, expected_path);
  const std::string text = s.bundle.read("golden/golden.txt");
  int n = 0, bad = 0;
  double max_diff = 0;
  size_t start = 0;
  for (int line_no = 1; start < text.size(); ++line_no) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(start, end - start);
    start = end + 1;
    const std::string where = list + ":" + std::to_string(line_no);
    const size_t space = line.rfind(' ');
    if (space == std::string::npos || space == 0)
      throw InputError(where + ": bad line '" + printable(line) + "' (expected '<file> <index>')");
    const std::string file = line.substr(0, space);
    check_relative(file, where);
    const int index = parse_index(line.substr(space + 1), static_cast<int>(s.labels.size()), where);
    const Json* item = nullptr;
    for (const Json& it : items.items)
      if (it.get("file") && it.get("file")->text == file) item = &it;
    if (item == nullptr) throw InputError(where + ": '" + printable(file) + "' has no entry in golden/expected.json");
    const Json& want = member(*item, "logits", Json::Array, expected_path);
    const Image x = resize_crop(load_rgb_bytes(s.bundle.read(file), s.bundle.path(file)), s.contract, s.bundle.path(file));
    const std::vector<float> z = checked_logits(model, x, s.labels.size());
    if (want.items.size() != z.size()) throw InputError(expected_path + ": '" + printable(file) + "': logits of another size");
    double diff = 0;
    for (size_t i = 0; i < z.size(); ++i) diff = std::max(diff, std::fabs(static_cast<double>(z[i]) - want.items[i].number));
    max_diff = std::max(max_diff, diff);
    const int got = argmax(z);
    ++n;
    if (got != index) {
      ++bad;
      std::cout << "MISMATCH " << printable(file) << ": expected " << printable(s.labels[index]) << ", got "
                << printable(s.labels[got]) << "\n";
    } else if (diff > atol) {
      ++bad;
      std::cout << "MISMATCH " << printable(file) << ": logits differ by " << diff << " > logit_atol " << atol << "\n";
    } else {
      std::cout << "ok " << printable(file) << ": " << printable(s.labels[got]) << " (max logit diff " << diff << ")\n";
    }
  }
  if (n == 0) throw InputError(list + ": no golden inputs listed");
  std::cout << "golden self-test " << (bad ? "FAILED" : "passed") << ": " << n - bad << " of " << n
            << " as recorded at build time (top-1, logits within " << atol << "; max logit diff " << max_diff << ") on "
            << model.executed_by() << "\n";
  return bad ? 1 : 0;
}

inline int classify(Model& model, const Session& s, const std::vector<std::string>& paths, bool probs) {
  for (const std::string& path : paths) {
    const Image x = resize_crop(load_rgb(path), s.contract, path);
    const std::vector<float> p = softmax(checked_logits(model, x, s.labels.size()));
    std::cout << printable(path);
    if (probs) {
      char buf[32];
      for (size_t i = 0; i < p.size(); ++i) std::snprintf(buf, sizeof buf, "%c%.9g", i ? ' ' : '\t', p[i]), std::cout << buf;
      std::cout << "\n";
    } else {
      const int k = argmax(p);
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.4f", p[k]);
      std::cout << "\t" << printable(s.labels[k]) << "\t" << buf << "\n";
    }
  }
  return 0;
}

inline int bench(Model& model, const Session& s, int runs) {
  Image x;
  x.width = s.contract.width, x.height = s.contract.height;
  x.rgb.resize(static_cast<size_t>(x.width) * x.height * 3);
  std::mt19937 rng(0);
  for (uint8_t& v : x.rgb) v = static_cast<uint8_t>(rng() & 0xff);
  for (int i = 0; i < std::min(runs, 10); ++i) model.logits(x);  // warm-up
  std::vector<double> ms;
  for (int i = 0; i < runs; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    model.logits(x);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  auto pct = [&ms](double q) {  // linear interpolation, as numpy.percentile
    const double at = q * (ms.size() - 1);
    const size_t lo = static_cast<size_t>(at), hi = std::min(lo + 1, ms.size() - 1);
    return ms[lo] + (ms[hi] - ms[lo]) * (at - lo);
  };
  std::printf("executed_by\t%s\nruns\t%d\nbatch1_p50_ms\t%.3f\nbatch1_p90_ms\t%.3f\n", model.executed_by().c_str(), runs,
              pct(0.5), pct(0.9));
  return 0;
}

// Hidden test mode: the model's input tensors (uint8 HWC, concatenated) of the images, written to OUT.
inline int dump_input(const Session& s, const std::string& out, const std::vector<std::string>& paths) {
  std::string all;
  for (const std::string& path : paths) {
    const Image x = resize_crop(load_rgb(path), s.contract, path);
    all.append(reinterpret_cast<const char*>(x.rgb.data()), x.rgb.size());
  }
  std::ofstream f(out, std::ios::binary);
  if (!f.write(all.data(), static_cast<std::streamsize>(all.size()))) throw InputError(out + ": cannot write");
  return 0;
}

using Loader = std::function<std::unique_ptr<Model>(const Bundle&, const ModelSpec&, const Contract&)>;

inline std::string first_line(const std::string& text) {
  const size_t start = text.find_first_not_of(" \n\r\t");
  if (start == std::string::npos) return "(no message)";
  const size_t end = text.find_first_of("\r\n", start);
  const std::string line = text.substr(start, end == std::string::npos ? std::string::npos : end - start);
  return end != std::string::npos && text.find_first_not_of(" \n\r\t", end) != std::string::npos ? line + " ..." : line;
}

inline int run(int argc, char** argv, const Loader& load) {
  const std::string usage = std::string("usage: ") + (argc ? argv[0] : "edgetl_classify") +
                            " BUNDLE_DIR [--no-verify] (--golden | --bench N | [--probs] IMAGE...)";
  std::vector<std::string> args(argv + std::min(argc, 1), argv + argc), images;
  bool verify = true, do_golden = false, probs = false;
  int runs = 0;
  std::string dump;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--no-verify") {
      verify = false;
    } else if (a == "--golden") {
      do_golden = true;
    } else if (a == "--probs") {
      probs = true;
    } else if ((a == "--bench" || a == "--dump-input") && i + 1 < args.size()) {
      if (a == "--dump-input") {
        dump = args[++i];
      } else {
        const std::string n = args[++i];
        const bool digits = !n.empty() && n.size() <= 7 &&
                            std::all_of(n.begin(), n.end(), [](unsigned char c) { return std::isdigit(c) != 0; });
        runs = digits ? std::stoi(n) : 0;
        if (runs < 1) return std::cerr << "--bench " << printable(n) << ": expected a number of runs, 1 or more\n", 2;
      }
    } else if (a.size() > 1 && a[0] == '-' && a[1] == '-') {
      return std::cerr << "unknown option " << printable(a) << "; " << usage << "\n", 2;
    } else {
      images.push_back(a);
    }
  }
  const int modes = int(do_golden) + int(runs > 0) + int(!images.empty() && dump.empty()) + int(!dump.empty());
  if (args.empty() || modes != 1) return std::cerr << usage << "\n", 2;
  try {
    Session s{Bundle(args[0], verify), Contract{}, {}};
    s.contract = read_contract(s.bundle);
    if (!dump.empty()) return dump_input(s, dump, images);
    s.labels = read_labels(s.bundle);
    const ModelSpec spec = model_spec(s.bundle);
    std::unique_ptr<Model> model = load(s.bundle, spec, s.contract);
    if (do_golden) return golden(*model, s, spec.name);
    if (runs > 0) return bench(*model, s, runs);
    return classify(*model, s, images, probs);
  } catch (const IntegrityError& e) {
    std::cerr << "error: " << printable(first_line(e.what())) << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << printable(first_line(e.what())) << "\n";
    return 2;
  }
}

}  // namespace edgetl
