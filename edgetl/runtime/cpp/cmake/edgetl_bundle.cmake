# edgetl bundle, C++ consumer: what both CMakeLists.txt share (included from them).
#
# 1. The bundle stays as published: a build folder inside it (`cmake -S cpp -B build` from the bundle
#    folder, or an in-source build) is refused before anything is compiled; `edgetl verify` and
#    predict.py refuse a bundle with files added. Build in a folder outside the bundle.
# 2. Float arithmetic as written: the resampling (image_io.hpp) must round like Pillow's, so no fused
#    multiply-add contraction (GCC contracts by default where the CPU has FMA, e.g. aarch64).
# 3. `install()` of the bundle itself next to the program (EDGETL_INSTALL_BUNDLE, default ON).
get_filename_component(EDGETL_BUNDLE_DIR "${CMAKE_CURRENT_SOURCE_DIR}/.." REALPATH)
get_filename_component(_edgetl_build "${CMAKE_BINARY_DIR}" REALPATH)
string(FIND "${_edgetl_build}/" "${EDGETL_BUNDLE_DIR}/" _edgetl_inside)
if(_edgetl_inside EQUAL 0)
  # (the leading space: CMake prints the message as one line instead of wrapping it)
  message(FATAL_ERROR " build folder ${_edgetl_build} is inside the bundle ${EDGETL_BUNDLE_DIR}, which must stay as published (edgetl verify refuses added files); fix: rm -r ${_edgetl_build} and use a folder outside the bundle, e.g. cmake -S ${EDGETL_BUNDLE_DIR}/cpp -B ${EDGETL_BUNDLE_DIR}/../edgetl-build")
endif()

set(CMAKE_CXX_STANDARD 17)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
# Release unless told otherwise, on single-configuration generators only. (Included before project(),
# where CMAKE_CONFIGURATION_TYPES is not yet set; the generator's property already is.)
get_property(_edgetl_multi_config GLOBAL PROPERTY GENERATOR_IS_MULTI_CONFIG)
if(NOT CMAKE_BUILD_TYPE AND NOT _edgetl_multi_config)
  set(CMAKE_BUILD_TYPE Release CACHE STRING "Build type" FORCE)
endif()

function(edgetl_target target)
  target_include_directories(${target} PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}")
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -ffp-contract=off)
  elseif(MSVC)
    target_compile_options(${target} PRIVATE /fp:precise)
  endif()
  # Installed: bin/edgetl_classify finds its runtime libraries in ../lib, wherever the folder is copied.
  set_target_properties(${target} PROPERTIES INSTALL_RPATH "$ORIGIN/../lib")
  include(GNUInstallDirs)
  install(TARGETS ${target} RUNTIME DESTINATION bin)
  option(EDGETL_INSTALL_BUNDLE "install the bundle next to the program (PREFIX/bundle)" ON)
  if(EDGETL_INSTALL_BUNDLE)
    install(DIRECTORY "${EDGETL_BUNDLE_DIR}/" DESTINATION bundle USE_SOURCE_PERMISSIONS)
  endif()
endfunction()

# Copies the shared libraries matching `glob` in `dir` to PREFIX/lib at install time, each with the
# chain of symbolic links that names it (libx.so -> libx.so.1 -> libx.so.1.2.3).
function(edgetl_install_libraries dir glob)
  install(CODE "
    file(GLOB _libs LIST_DIRECTORIES false \"${dir}/${glob}\")
    foreach(_lib IN LISTS _libs)
      file(INSTALL \"\${_lib}\" DESTINATION \"\${CMAKE_INSTALL_PREFIX}/lib\" FOLLOW_SYMLINK_CHAIN)
    endforeach()")
endfunction()
