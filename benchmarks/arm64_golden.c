// LD_PRELOAD for qemu < 8.2: open("/proc/cpuinfo") reads $EDGETL_ARM64_CPUINFO instead (test scaffolding)
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static const char* swap(const char* p) {
  const char* fake = getenv("EDGETL_ARM64_CPUINFO");
  return fake && p && strcmp(p, "/proc/cpuinfo") == 0 ? fake : p;
}
#define MODE mode_t mode = 0; \
  if (flags & O_CREAT) { va_list ap; va_start(ap, flags); mode = va_arg(ap, mode_t); va_end(ap); }
#define REAL(name, type) static type real; if (!real) real = (type)dlsym(RTLD_NEXT, name)
typedef int (*open_t)(const char*, int, ...);
typedef int (*openat_t)(int, const char*, int, ...);
typedef FILE* (*fopen_t)(const char*, const char*);
int open(const char* p, int flags, ...) { MODE; REAL("open", open_t); return real(swap(p), flags, mode); }
int open64(const char* p, int flags, ...) { MODE; REAL("open64", open_t); return real(swap(p), flags, mode); }
int openat(int d, const char* p, int flags, ...) {
  MODE; REAL("openat", openat_t); return real(d, swap(p), flags, mode);
}
FILE* fopen(const char* p, const char* m) { REAL("fopen", fopen_t); return real(swap(p), m); }
FILE* fopen64(const char* p, const char* m) { REAL("fopen64", fopen_t); return real(swap(p), m); }
