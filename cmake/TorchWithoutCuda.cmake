# Defines TORCH_LIBRARIES and TORCH_INSTALL_PREFIX for goft's CPU ops against a CUDA build of
# torch, when goft's own CUDA kernels are not built (GOFT_CUDA=OFF, or no nvcc was found).
#
# torch's CMake config (find_package(Torch)) of a CUDA build requires the CUDA toolkit whatever
# the consumer compiles (Caffe2Config.cmake stops with "Your installed Caffe2 version uses CUDA
# but I cannot find the CUDA libraries"), and a CUDA torch installed by pip on a machine without
# the toolkit has none: goft could not be installed there at all. The CPU ops need only torch's
# headers, its c10, torch_cpu and torch libraries and its C++ ABI, which torch itself reports.

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
          "import torch, torch.utils.cpp_extension as e; print(';'.join(e.include_paths())); print(e.library_paths()[0]); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
  OUTPUT_VARIABLE _goft_torch_out OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
string(REPLACE "\n" ";" _goft_torch_lines "${_goft_torch_out}")
# The include paths are themselves a ';' list: the last two lines are the library folder and the ABI.
list(POP_BACK _goft_torch_lines _goft_torch_abi)
list(POP_BACK _goft_torch_lines _goft_torch_lib_dir)

add_library(goft_torch_without_cuda INTERFACE)
target_include_directories(goft_torch_without_cuda SYSTEM INTERFACE ${_goft_torch_lines})
foreach(_goft_lib c10 torch_cpu torch)
  find_library(_goft_lib_path_${_goft_lib} NAMES ${_goft_lib} PATHS "${_goft_torch_lib_dir}" NO_DEFAULT_PATH REQUIRED)
  target_link_libraries(goft_torch_without_cuda INTERFACE "${_goft_lib_path_${_goft_lib}}")
endforeach()
target_compile_definitions(goft_torch_without_cuda INTERFACE _GLIBCXX_USE_CXX11_ABI=${_goft_torch_abi})

set(TORCH_LIBRARIES goft_torch_without_cuda)
get_filename_component(TORCH_INSTALL_PREFIX "${_goft_torch_lib_dir}" DIRECTORY)
