"""Developer tools: the chaos test of checkpointing and resume."""
