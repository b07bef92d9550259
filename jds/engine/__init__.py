"""Running requests through the model: batching, slots, stopping."""
