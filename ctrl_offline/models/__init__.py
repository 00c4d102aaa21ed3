"""Models, rewards and their data: the embedded model and prompts, loading (LoRA / QLoRA), sampling and
log-probs, reward loading, the HH format."""
