"""Low-level kernel runtime: compile generated C++ / CUDA C++ and load and launch it."""
