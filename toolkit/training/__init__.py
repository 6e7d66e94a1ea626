"""The layer every trainer (sft, reward, rlhf) stands on: Accelerate set-up and gradient accumulation,
model preparation (dropout off, LoRA), the learning-rate schedule, checkpoints, the run log and its curves.
It imports nothing from the trainers above it."""
