# Compiles every CUDA source of goft to object code with nvcc for sm_80 and sm_90, against
# torch's headers only: a syntax and type check of the kernels and their ATen bindings that needs
# no GPU and no CUDA build of torch, so CI catches a broken kernel on CPU-only machines.
# Also builds goft_cuda_emulated (tests/cpp/test_cuda_emulated.cpp), which runs the kernel bodies
# on the host and compares them with the CPU kernels; CI runs it after the build.
#
#   cmake -S . -B build/cuda-check -DGOFT_CUDA_SYNTAX_CHECK=ON -DGOFT_BUILD_BENCH=OFF
#   cmake --build build/cuda-check -j2 && build/cuda-check/goft_cuda_emulated --quick
#
# -DGOFT_CUDA_EMULATOR_TSAN=ON adds goft_cuda_emulated_tsan, the emulator under ThreadSanitizer.

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  message(FATAL_ERROR "GOFT_CUDA_SYNTAX_CHECK=ON needs nvcc: put it on PATH or set CMAKE_CUDA_COMPILER")
endif()
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES 80 90)
endif()
enable_language(CUDA)
# The project's C++ standard, as for the extension (CMake 3.25 knows no CUDA20 for nvcc).
set(CMAKE_CUDA_STANDARD ${CMAKE_CXX_STANDARD})
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
find_package(CUDAToolkit REQUIRED)
find_package(Threads REQUIRED)

find_package(Python 3.9 REQUIRED COMPONENTS Interpreter)
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
          "import torch.utils.cpp_extension as e; print(';'.join(e.include_paths()))"
  OUTPUT_VARIABLE _goft_torch_includes OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)

add_library(goft_cuda_check OBJECT cpp/torch/ops_cuda.cu ${GOFT_CUDA_KERNEL_SOURCES})
target_link_libraries(goft_cuda_check PRIVATE goft_core)
target_include_directories(goft_cuda_check PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/cpp/torch)
# SYSTEM: warnings inside torch's headers are torch's, not ours.
target_include_directories(goft_cuda_check SYSTEM PRIVATE ${_goft_torch_includes})
# A CPU-only torch wheel ships c10/cuda without the generated cuda_cmake_macros.h, which only
# carries the Windows DLL export switch; this define makes c10 skip it.
target_compile_definitions(goft_cuda_check PRIVATE C10_CUDA_NO_CMAKE_CONFIGURE_FILE)
# The flags torch's CMake config adds for CUDA extensions.
target_compile_options(goft_cuda_check PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr --expt-extended-lambda>)
# Light device optimisation by default: every stage still runs (front end, PTX for each
# architecture, SASS assembly), about 3x faster than the extension's full optimisation.
option(GOFT_CUDA_SYNTAX_CHECK_FULL_OPT "Compile the checked CUDA objects at full device optimisation" OFF)
if(NOT GOFT_CUDA_SYNTAX_CHECK_FULL_OPT)
  target_compile_options(goft_cuda_check PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcicc=-O1 -Xptxas=-O1>)
endif()
# The checked objects are not linked; a default ALL build compiles them.
set_target_properties(goft_cuda_check PROPERTIES CUDA_SEPARABLE_COMPILATION OFF)

# The emulator: the kernels' bodies on the host (cuda_bf16.h and cuda_fp16.h have host
# implementations, so it needs only the toolkit's headers). Its run time is thread switching, not
# arithmetic: -O1 compiles in a third of -O3's time.
function(goft_add_cuda_emulator name)
  add_executable(${name} tests/cpp/test_cuda_emulated.cpp)
  target_link_libraries(${name} PRIVATE goft_core Threads::Threads)
  target_include_directories(${name} PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
  target_compile_features(${name} PRIVATE cxx_std_20)  # std::barrier, std::atomic_ref
  target_compile_options(${name} PRIVATE -O1 ${ARGN})
  target_link_options(${name} PRIVATE ${ARGN})
endfunction()
goft_add_cuda_emulator(goft_cuda_emulated)
# The same emulator under ThreadSanitizer (see its header comment): blocks at once, shuffles that
# order no memory. Slower (CI runs it on the cases with warp layers and the strict fallback).
option(GOFT_CUDA_EMULATOR_TSAN "With GOFT_CUDA_SYNTAX_CHECK=ON, also build goft_cuda_emulated_tsan, the emulator under ThreadSanitizer" OFF)
if(GOFT_CUDA_EMULATOR_TSAN)
  # Line tables only (-g1): ThreadSanitizer's reports name each frame's file and line, which is all
  # CI reads from them; compiles in two thirds of -g's time.
  goft_add_cuda_emulator(goft_cuda_emulated_tsan -g1 -fsanitize=thread)
endif()
message(STATUS "goft: CUDA syntax check for architectures ${CMAKE_CUDA_ARCHITECTURES}")
