"""Inference engines behind one interface: the native torch engine and the llama.cpp engine."""
