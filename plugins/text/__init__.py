"""Text parts: the semi-autoregressive block sampler, LLaDA's linear schedule, GSM8K-style prompts and rewards."""
