"""Compiled kernels and their loaders: the C++ CPU ops (csrc/) and oneDNN
linear layers. Imports nothing else of the engine."""
