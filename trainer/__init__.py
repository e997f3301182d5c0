"""Student training on shard sets: losses, data, Ray workers, evaluation."""
