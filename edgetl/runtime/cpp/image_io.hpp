// edgetl bundle, C++ consumer: images in, the model's uint8 RGB input out, bit for bit what the
// bundle's preprocess.py (Pillow) gives. PPM (P6, maxval 255) and PNG (stb_image, vendored in
// third_party/) of any size; then preprocess.json's resize (Pillow's resampling, ported below) and
// centre crop. Refused, in one line, is what cannot be reproduced exactly: other formats (JPEG:
// decoders differ), PNGs whose EXIF/XMP asks for a rotation, images over Pillow's 89,478,485-pixel
// decompression-bomb limit.
//
// The contract (also in the bundle README):
//   decode   PNG: grey -> R=G=B; 16-bit grey -> round(v / 257); 16-bit colour -> the high byte;
//            palette -> its colours. PPM: P6, maxval 255, header tokens separated by whitespace and
//            '#' comments, one whitespace after maxval (a "\r\n" there when the file size says so),
//            file size = header + width * height * 3 exactly.
//   alpha    (RGBA, grey+alpha, palette with tRNS) composited over white with Pillow's integer
//            alpha_composite; a colour key (tRNS on grey/RGB) is ignored, as Pillow does.
//   EXIF     orientation 1 or none; any other is refused (Pillow would rotate).
//   resize   shorter side to resize_size: scale = resize_size / min(w, h), new size
//            max(crop, round-half-even(side * scale)) per side; Pillow's two-pass convolution
//            (uint8 in between; the order of the passes as Pillow's, see resize()), 22-bit
//            fixed-point weights.
//   crop     left = (new_w - crop_w) / 2, top = (new_h - crop_h) / 2 (floor), RGB order, HWC.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define STBI_ONLY_PNG
#define STBI_NO_STDIO
#define STBI_NO_LINEAR
#define STBI_NO_HDR
#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#include "third_party/stb_image.h"

namespace edgetl {

// An error in the user's input or the bundle: main prints it on one line and exits 2.
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Printable, one line, at most `cap` bytes: control and non-ASCII bytes as \xNN.
inline std::string printable(const std::string& text, size_t cap = 400) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned char c : text) {
    if (out.size() >= cap) return out + "...";
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // height x width x 3, row-major (HWC), RGB
};

constexpr uint64_t kMaxPixels = 89478485;  // Pillow's Image.MAX_IMAGE_PIXELS: predict.py refuses more

inline std::string read_file(const std::string& path, uint64_t cap = (uint64_t(1) << 31) - 1) {  // int-sized
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw InputError(path + ": cannot open");
  const std::streamoff size = in.tellg();
  if (size < 0) throw InputError(path + ": cannot read");
  if (static_cast<uint64_t>(size) > cap) throw InputError(path + ": larger than " + std::to_string(cap) + " bytes");
  std::string data(static_cast<size_t>(size), '\0');
  in.seekg(0);
  if (!in.read(&data[0], size)) throw InputError(path + ": cannot read");
  return data;
}

// ---- PPM (P6) ----------------------------------------------------------------------------------

inline bool ppm_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

// The next header token of `d` from `pos`, '#' comments (to the end of the line) skipped; a token
// ends at whitespace or '#', and `pos` is left on that byte. Tokens and comments are capped.
inline std::string ppm_token(const std::string& d, size_t& pos, const std::string& path, const char* what) {
  constexpr size_t kToken = 10, kComment = 4096;
  for (;;) {
    if (pos >= d.size()) throw InputError(path + ": bad PPM header (no " + what + ": the file ends)");
    if (d[pos] == '#') {
      const size_t start = pos;
      while (pos < d.size() && d[pos] != '\n' && d[pos] != '\r') {
        if (++pos - start > kComment)
          throw InputError(path + ": bad PPM header (a comment longer than " + std::to_string(kComment) + " bytes)");
      }
    } else if (ppm_space(d[pos])) {
      ++pos;
    } else {
      break;
    }
  }
  std::string token;
  while (pos < d.size() && !ppm_space(d[pos]) && d[pos] != '#') {
    if (token.size() == kToken)
      throw InputError(path + ": bad PPM header (" + what + " '" + printable(token) + "...': too long)");
    token += d[pos++];
  }
  return token;
}

inline int ppm_int(const std::string& d, size_t& pos, const std::string& path, const char* what) {
  const std::string token = ppm_token(d, pos, path, what);
  const bool digits = !token.empty() && token.size() <= 9 &&
                      std::all_of(token.begin(), token.end(), [](char c) { return c >= '0' && c <= '9'; });
  if (!digits || std::stoi(token) == 0)
    throw InputError(path + ": bad PPM header (" + what + " '" + printable(token) + "')");
  return std::stoi(token);
}

inline Image decode_ppm(const std::string& d, const std::string& path) {
  if (d.compare(0, 2, "P6") != 0 || d.size() < 3 || !(ppm_space(d[2]) || d[2] == '#'))
    throw InputError(path + ": not a binary PPM (P6); fix: convert it to PNG or P6 (Pillow: Image.save('x.ppm'))");
  size_t pos = 2;
  Image image;
  image.width = ppm_int(d, pos, path, "width");
  image.height = ppm_int(d, pos, path, "height");
  const int maxval = ppm_int(d, pos, path, "maxval");
  if (maxval != 255)
    throw InputError(path + ": PPM maxval " + std::to_string(maxval) + ": only 8-bit PPM (maxval 255) is read");
  if (static_cast<uint64_t>(image.width) * image.height > kMaxPixels)
    throw InputError(path + ": " + std::to_string(image.width) + "x" + std::to_string(image.height) +
                     " pixels: over the 89478485-pixel limit (Pillow's decompression-bomb limit, as predict.py)");
  if (pos >= d.size() || !ppm_space(d[pos]))
    throw InputError(path + ": bad PPM header (no whitespace after maxval)");
  const uint64_t need = static_cast<uint64_t>(image.width) * image.height * 3;
  // One whitespace byte ends the header; "\r\n" counts as one when the file size says so (the
  // pixels would otherwise start at '\n' and every channel would shift by one).
  size_t start = pos + 1;
  if (d[pos] == '\r' && start < d.size() && d[start] == '\n' && d.size() - start - 1 == need) ++start;
  if (d.size() - start != need)
    throw InputError(path + ": " + std::to_string(d.size() - start) + " bytes after the PPM header, " +
                     std::to_string(image.width) + "x" + std::to_string(image.height) + "x3 = " +
                     std::to_string(need) + " expected (" + (d.size() - start < need ? "truncated" : "trailing bytes") +
                     ")");
  image.rgb.assign(d.begin() + static_cast<std::ptrdiff_t>(start), d.end());
  return image;
}

// ---- PNG ---------------------------------------------------------------------------------------

inline uint32_t be32(const unsigned char* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

inline uint32_t crc32(const unsigned char* p, size_t n) {
  static uint32_t table[256];
  static bool ready = false;
  if (!ready) {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    ready = true;
  }
  uint32_t c = 0xffffffffu;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

// EXIF orientation (tag 0x0112) of a TIFF-structured block: 0 when absent.
inline int exif_orientation(const std::string& e, const std::string& path) {
  const auto* p = reinterpret_cast<const unsigned char*>(e.data());
  const size_t n = e.size();
  if (n < 8 || !((p[0] == 'I' && p[1] == 'I') || (p[0] == 'M' && p[1] == 'M')))
    throw InputError(path + ": unreadable EXIF block (eXIf chunk); fix: strip the metadata");
  const bool le = p[0] == 'I';
  auto u16 = [&](size_t at) { return le ? p[at] | (p[at + 1] << 8) : (p[at] << 8) | p[at + 1]; };
  auto u32 = [&](size_t at) {
    return le ? uint32_t(p[at]) | uint32_t(p[at + 1]) << 8 | uint32_t(p[at + 2]) << 16 | uint32_t(p[at + 3]) << 24
              : be32(p + at);
  };
  const uint32_t ifd = u32(4);
  if (ifd > n || n - ifd < 2) throw InputError(path + ": unreadable EXIF block (eXIf chunk); fix: strip the metadata");
  const int entries = u16(ifd);
  for (int i = 0; i < entries; ++i) {
    const size_t at = ifd + 2 + 12 * static_cast<size_t>(i);
    if (at + 12 > n) break;
    if (u16(at) == 0x0112) return u16(at + 8);
  }
  return 0;
}

// The PNG's chunks (CRC checked, as Pillow does) and what the pixels alone do not say.
struct PngInfo {
  int width = 0, height = 0, depth = 0, colour = 0;
  bool trns = false;
  int orientation = 0;
};

inline PngInfo png_info(const std::string& d, const std::string& path) {
  PngInfo info;
  const auto* p = reinterpret_cast<const unsigned char*>(d.data());
  size_t pos = 8;
  bool ihdr = false, iend = false;
  int xmp_orientation = 0;
  while (!iend) {
    if (d.size() - pos < 12) throw InputError(path + ": truncated PNG (a chunk is cut short)");
    const uint32_t len = be32(p + pos);
    const std::string type = d.substr(pos + 4, 4);
    if (len > d.size() - pos - 12) throw InputError(path + ": truncated PNG (chunk '" + printable(type) + "')");
    if (crc32(p + pos + 4, len + 4) != be32(p + pos + 8 + len))
      throw InputError(path + ": broken PNG (CRC of chunk '" + printable(type) + "')");
    const bool wanted = type == "eXIf" || type == "tEXt" || type == "zTXt" || type == "iTXt";
    const std::string data = wanted ? d.substr(pos + 8, len) : std::string();
    if (type == "IHDR" && len == 13) {
      info.width = static_cast<int>(std::min<uint32_t>(be32(p + pos + 8), 1u << 30));
      info.height = static_cast<int>(std::min<uint32_t>(be32(p + pos + 12), 1u << 30));
      info.depth = p[pos + 16];
      info.colour = p[pos + 17];
      ihdr = true;
    } else if (type == "tRNS") {
      info.trns = true;
    } else if (type == "eXIf") {
      info.orientation = exif_orientation(data, path);
    } else if (type == "tEXt" || type == "zTXt" || type == "iTXt") {
      const std::string key = data.substr(0, data.find('\0'));
      if (key == "Raw profile type exif")
        throw InputError(path + ": EXIF in a text chunk ('Raw profile type exif'), which this reader does not parse; "
                         "fix: strip the metadata, or use predict.py");
      if (key == "XML:com.adobe.xmp") {  // Pillow reads an XMP orientation when EXIF has none
        const bool compressed = type == "zTXt" || (type == "iTXt" && data.size() > key.size() + 1 && data[key.size() + 1]);
        if (compressed)
          throw InputError(path + ": compressed XMP metadata (it may hold an orientation); fix: strip the metadata");
        for (size_t at = data.find("tiff:Orientation"); at != std::string::npos && !xmp_orientation;
             at = data.find("tiff:Orientation", at + 1)) {  // Pillow: tiff:Orientation(="|>)([0-9])
          size_t v = at + 16;
          if (v < data.size() && data[v] == '=' && v + 1 < data.size() && data[v + 1] == '"') v += 2;
          else if (v < data.size() && data[v] == '>') v += 1;
          else continue;
          if (v < data.size() && data[v] >= '0' && data[v] <= '9') xmp_orientation = data[v] - '0';
        }
      }
    } else if (type == "IEND") {
      iend = true;
    }
    pos += 12 + len;
  }
  if (!ihdr) throw InputError(path + ": broken PNG (no IHDR chunk)");
  if (!info.orientation) info.orientation = xmp_orientation;
  return info;
}

inline Image decode_png(const std::string& d, const std::string& path) {
  const PngInfo info = png_info(d, path);
  if (info.orientation >= 2 && info.orientation <= 8)
    throw InputError(path + ": EXIF orientation " + std::to_string(info.orientation) +
                     " (Pillow rotates the image, this reader does not); fix: rotate the pixels and drop the tag");
  if (static_cast<uint64_t>(info.width) * info.height > kMaxPixels)
    throw InputError(path + ": " + std::to_string(info.width) + "x" + std::to_string(info.height) +
                     " pixels: over the 89478485-pixel limit (Pillow's decompression-bomb limit, as predict.py)");
  // What Pillow opens it as: grey (16-bit: scaled), RGB, RGBA / LA / palette with tRNS (composited).
  const bool grey16 = info.colour == 0 && info.depth == 16;
  int channels = 3;
  if (info.colour == 0) channels = 1;
  if (info.colour == 4) channels = 2;
  if (info.colour == 6 || (info.colour == 3 && info.trns)) channels = 4;
  const auto* bytes = reinterpret_cast<const stbi_uc*>(d.data());
  const int size = static_cast<int>(d.size());
  int w = 0, h = 0, n = 0;
  void* raw = grey16 ? static_cast<void*>(stbi_load_16_from_memory(bytes, size, &w, &h, &n, 1))
                     : static_cast<void*>(stbi_load_from_memory(bytes, size, &w, &h, &n, channels));
  if (raw == nullptr)
    throw InputError(path + ": cannot decode the PNG (" + printable(stbi_failure_reason()) + ")");
  std::unique_ptr<void, void (*)(void*)> hold(raw, stbi_image_free);
  Image image;
  image.width = w;
  image.height = h;
  const size_t pixels = static_cast<size_t>(w) * h;
  image.rgb.resize(pixels * 3);
  for (size_t i = 0; i < pixels; ++i) {
    uint8_t* out = &image.rgb[i * 3];
    if (grey16) {
      const unsigned v = static_cast<const uint16_t*>(raw)[i];
      out[0] = out[1] = out[2] = static_cast<uint8_t>((2 * v + 257) / 514);  // round(v / 257), no ties
      continue;
    }
    const uint8_t* in = static_cast<const uint8_t*>(raw) + i * channels;
    const unsigned r = in[0], g = channels >= 3 ? in[1] : in[0], b = channels >= 3 ? in[2] : in[0];
    const unsigned a = channels == 2 ? in[1] : channels == 4 ? in[3] : 255;
    if (channels == 1 || channels == 3) {
      out[0] = r, out[1] = g, out[2] = b;
      continue;
    }
    // Pillow's ImagingAlphaComposite (AlphaComposite.c) of the pixel over opaque white.
    if (a == 0) {
      out[0] = out[1] = out[2] = 255;
      continue;
    }
    const uint32_t blend = 255u * (255u - a), outa255 = a * 255u + blend;
    const uint32_t coef1 = a * 255u * 255u * 128u / outa255, coef2 = 255u * 128u - coef1;
    auto mix = [&](uint32_t s) {
      const uint32_t t = s * coef1 + 255u * coef2 + (0x80u << 7);
      return static_cast<uint8_t>((((t >> 8) + t) >> 8) >> 7);
    };
    out[0] = mix(r), out[1] = mix(g), out[2] = mix(b);
  }
  return image;
}

// Any supported image file -> 8-bit RGB, as preprocess.load_rgb gives it.
inline Image load_rgb_bytes(const std::string& d, const std::string& path) {
  if (d.empty()) throw InputError(path + ": empty file (0 bytes)");
  if (d.size() >= 8 && d.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0) return decode_png(d, path);
  if (d.size() >= 2 && d[0] == 'P' && d[1] >= '1' && d[1] <= '7' && d[1] != '6')
    throw InputError(path + ": a PPM/PGM/PBM of type P" + std::string(1, d[1]) + ": only binary RGB PPM (P6) is read; "
                     "fix: convert it to PNG or P6");
  if (d.size() >= 2 && d[0] == 'P') return decode_ppm(d, path);
  if (d.size() >= 3 && static_cast<unsigned char>(d[0]) == 0xff && static_cast<unsigned char>(d[1]) == 0xd8)
    throw InputError(path + ": JPEG is not read here (a JPEG decoder other than Pillow's gives other pixels); fix: "
                     "decode it with Pillow and save PNG, or use predict.py");
  throw InputError(path + ": not a PNG or binary PPM (P6); fix: convert it to PNG");
}

inline Image load_rgb(const std::string& path) { return load_rgb_bytes(read_file(path), path); }

// ---- Resampling: a port of Pillow's src/libImaging/Resample.c (8 bits per channel) -------------
// Pillow is (c) 1997-2011 Secret Labs AB, (c) 1995-2011 Fredrik Lundh and contributors, under the
// MIT-CMU (HPND) licence; this is our own code following its algorithm and rounding exactly:
// double-precision filter weights, normalised, then fixed point with 22 fraction bits.
// Built with -ffp-contract=off (CMakeLists.txt): a fused multiply-add would round differently.

struct Filter {
  double (*weight)(double);
  double support;
};

inline double bilinear_weight(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

inline double bicubic_weight(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

inline Filter filter_named(const std::string& name, const std::string& where) {
  if (name == "bilinear") return {bilinear_weight, 1.0};
  if (name == "bicubic") return {bicubic_weight, 2.0};
  throw InputError(where + ": interpolation '" + printable(name) + "' is not one this consumer reproduces "
                   "(bilinear, bicubic)");
}

constexpr int kPrecisionBits = 32 - 8 - 2;

struct Coefficients {
  int ksize = 0;
  std::vector<int> bounds;     // per output pixel: first input pixel, count
  std::vector<int32_t> fixed;  // per output pixel: ksize weights, fixed point
};

inline Coefficients coefficients(int in_size, int out_size, const Filter& filter) {
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);
  double scale = static_cast<double>(in1 - in0) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = filter.support * filterscale;
  Coefficients c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(static_cast<size_t>(out_size) * 2);
  c.fixed.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> k(static_cast<size_t>(c.ksize));
  const double inv_filterscale = 1.0 / filterscale;
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int x = 0; x < xmax; ++x) {
      const double w = filter.weight((x + xmin - center + 0.5) * inv_filterscale);
      k[x] = w;
      ww += w;
    }
    if (ww != 0.0)
      for (int x = 0; x < xmax; ++x) k[x] /= ww;
    for (int x = 0; x < xmax; ++x) {
      const double v = k[x];
      c.fixed[static_cast<size_t>(xx) * c.ksize + x] =
          v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPrecisionBits)) : static_cast<int32_t>(0.5 + v * (1 << kPrecisionBits));
    }
    c.bounds[xx * 2] = xmin;
    c.bounds[xx * 2 + 1] = xmax;
  }
  return c;
}

inline uint8_t clip8(int32_t ss) {
  const int32_t v = ss >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
}

inline Image horizontal_pass(const Image& cur, int width, const Filter& filter) {
  const Coefficients c = coefficients(cur.width, width, filter);
  Image out;
  out.width = width, out.height = cur.height;
  out.rgb.resize(static_cast<size_t>(width) * cur.height * 3);
  for (int y = 0; y < cur.height; ++y) {
    const uint8_t* line = &cur.rgb[static_cast<size_t>(y) * cur.width * 3];
    uint8_t* dst = &out.rgb[static_cast<size_t>(y) * width * 3];
    for (int xx = 0; xx < width; ++xx) {
      const int xmin = c.bounds[xx * 2], xmax = c.bounds[xx * 2 + 1];
      const int32_t* k = &c.fixed[static_cast<size_t>(xx) * c.ksize];
      int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
      for (int x = 0; x < xmax; ++x) {
        const uint8_t* px = line + static_cast<size_t>(x + xmin) * 3;
        s0 += px[0] * k[x], s1 += px[1] * k[x], s2 += px[2] * k[x];
      }
      dst[xx * 3] = clip8(s0), dst[xx * 3 + 1] = clip8(s1), dst[xx * 3 + 2] = clip8(s2);
    }
  }
  return out;
}

inline Image vertical_pass(const Image& cur, int height, const Filter& filter) {
  const Coefficients c = coefficients(cur.height, height, filter);
  Image out;
  out.width = cur.width, out.height = height;
  const size_t stride = static_cast<size_t>(cur.width) * 3;
  out.rgb.resize(stride * height);
  for (int yy = 0; yy < height; ++yy) {
    const int ymin = c.bounds[yy * 2], ymax = c.bounds[yy * 2 + 1];
    const int32_t* k = &c.fixed[static_cast<size_t>(yy) * c.ksize];
    uint8_t* dst = &out.rgb[yy * stride];
    for (size_t xc = 0; xc < stride; ++xc) {
      int32_t s = 1 << (kPrecisionBits - 1);
      for (int y = 0; y < ymax; ++y) s += cur.rgb[static_cast<size_t>(y + ymin) * stride + xc] * k[y];
      dst[xc] = clip8(s);
    }
  }
  return out;
}

// Pillow's Image.resize(size, filter) of an RGB image: two passes, each rounding to uint8. Their
// order is Pillow's and changed in Pillow 13.0: there the vertical pass runs first when the height
// shrinks by more than twice as many pixels as the width does; before (Pillow <= 12), the
// horizontal pass runs first unless the image is over 100 times taller than wide and its height
// shrinks. The bundle says which Pillow made it (manifest.json "versions"), the default is 13.
inline Image resize(const Image& in, int width, int height, const Filter& filter, int pillow_major = 13) {
  if (in.width == width && in.height == height) return in;
  const bool vertical_first = pillow_major >= 13
                                  ? in.height - height > 0 && in.height - height > (in.width - width) * 2
                                  : in.height > in.width * 100 && height < in.height;
  if (vertical_first) {
    const Image v = height != in.height ? vertical_pass(in, height, filter) : in;
    return width != in.width ? horizontal_pass(v, width, filter) : v;
  }
  const Image h = width != in.width ? horizontal_pass(in, width, filter) : in;
  return height != in.height ? vertical_pass(h, height, filter) : h;
}

// preprocess.json's resize and crop (preprocess.resize_crop).
struct Contract {
  int height = 0, width = 0, resize_size = 0;
  Filter filter{bilinear_weight, 1.0};
  int pillow_major = 13;  // the Pillow that made the bundle: its resize order (see resize())
};

inline Image resize_crop(const Image& img, const Contract& c, const std::string& path = "an image") {
  const double scale = static_cast<double>(c.resize_size) / std::min(img.width, img.height);
  const double dw = std::max<double>(c.width, std::nearbyint(img.width * scale));   // Python's round():
  const double dh = std::max<double>(c.height, std::nearbyint(img.height * scale));  // half to even
  if (dw * dh > static_cast<double>(kMaxPixels))  // (also keeps each side below INT_MAX: a cast beyond is undefined)
    throw InputError(path + ": " + std::to_string(img.width) + "x" + std::to_string(img.height) + ", resized to " +
                     std::to_string(static_cast<uint64_t>(dw)) + "x" + std::to_string(static_cast<uint64_t>(dh)) +
                     " it would be over the " + std::to_string(kMaxPixels) +
                     "-pixel limit; fix: crop it to a less extreme aspect ratio");
  const int nw = static_cast<int>(dw), nh = static_cast<int>(dh);
  const Image big = resize(img, nw, nh, c.filter, c.pillow_major);
  const int left = (nw - c.width) / 2, top = (nh - c.height) / 2;
  Image out;
  out.width = c.width, out.height = c.height;
  out.rgb.resize(static_cast<size_t>(c.width) * c.height * 3);
  for (int y = 0; y < c.height; ++y)
    std::memcpy(&out.rgb[static_cast<size_t>(y) * c.width * 3],
                &big.rgb[(static_cast<size_t>(y + top) * nw + left) * 3], static_cast<size_t>(c.width) * 3);
  return out;
}

}  // namespace edgetl
