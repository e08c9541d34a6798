"""Scale-out: dp × sp topology, DeepSpeed engine set-up, Ulysses sequence parallelism, activation checkpointing."""
