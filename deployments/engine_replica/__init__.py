"""The LLMServer's private helpers: adapter residency, message coalescing, the engine-process reaper."""
