"""Negatives wiring of the training step: in-batch, global, corpus samples, memory, impression and
mined hard negatives, and the logQ correction of their mixture."""
