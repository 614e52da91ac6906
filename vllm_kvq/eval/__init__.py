"""Quality measurement through a running server: perplexity, needle retrieval, lm-eval tasks, sweeps."""
