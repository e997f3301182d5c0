"""Teacher service: engines that produce top-k log-probs, the REST API and precompute jobs."""
