"""Inference engines behind one interface: the native torch engine and the llama.cpp engine."""

DEFAULT_MAX_CONTEXT = 4096  # tokens a session holds unless asked for more; `plan` plans for it too
