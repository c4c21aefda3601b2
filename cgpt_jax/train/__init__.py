"""Training: optimizer and schedule, sharded train state, the train step, the loop and its writers."""
