"""Sparse matmuls: N:M packed weights and activation-sparse (online-pruned) inputs."""
