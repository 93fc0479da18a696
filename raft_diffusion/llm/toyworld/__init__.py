"""The toy text world: synthetic reviews (corpus), their builder (build) and rewards (rewards)."""
