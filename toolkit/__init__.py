import os
from pathlib import Path

# DeepSpeed, once installed, is imported by transformers and Accelerate wherever a model is built, DeepSpeed in use
# or not, and logs on stdout which accelerator it fell back to (stdout carries --json's one line). Without an NVIDIA
# device, name the CPU and it stays silent; checked here, before any model, without importing torch.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
