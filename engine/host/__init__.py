"""Host tuning of the engine process: OpenMP threads, malloc, huge pages, CPU features."""
