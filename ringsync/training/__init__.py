"""Training on top of the collectives: a tiny MLP (nn), SGD and DistributedOptimizer (optim),
data and sharding (data), checkpoints (checkpoint), and the ringsync-train command (train)."""
