"""Training: the CTRL trainers on TRL and their configs, and holding a KL budget while training."""
