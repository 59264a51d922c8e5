# sslmedsam2_copy_engine(<source_dir> <destination_dir>)
#
# Copies the engine package (src/sslmedsam2: its .py files, the sample image and its notes) into a folder. The
# module finds the engine beside itself (SSLMedSAM2Lib/launch.py, engine_source): an installed extension gets it
# from the install() rule in CMakeLists.txt, and the build tree, where ctest loads the module from
# (${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}), from this copy.
function(sslmedsam2_copy_engine source_dir destination_dir)
  set(_glob_options)
  if(NOT CMAKE_SCRIPT_MODE_FILE)
    set(_glob_options CONFIGURE_DEPENDS)  # a new engine file is copied at the next build
  endif()
  file(GLOB_RECURSE _engine_files RELATIVE ${source_dir} ${_glob_options}
    ${source_dir}/*.py ${source_dir}/*.nii.gz ${source_dir}/*.md)
  foreach(_engine_file IN LISTS _engine_files)
    # configure_file: copied again whenever the source file changes
    configure_file(${source_dir}/${_engine_file} ${destination_dir}/${_engine_file} COPYONLY)
  endforeach()
endfunction()

# sslmedsam2_copy_pyproject(<pyproject.toml> <destination_file>)
#
# Copies the engine's pyproject.toml (its requires-python and dependencies: what the module checks and installs)
# to where the module looks for it beside the engine package (SSLMedSAM2Lib/compatibility.py, pyproject_path).
function(sslmedsam2_copy_pyproject source_file destination_file)
  configure_file(${source_file} ${destination_file} COPYONLY)
endfunction()
