"""The step loop and the offline API: LLM, LLMEngine, the model runner,
the sampler, output processing, the paged cache tensors and eviction."""
