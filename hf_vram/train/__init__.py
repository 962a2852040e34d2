"""What runs inside training: the trainers hf-vram subclasses, the MoE router's loss, the denoising step's pieces,
and the memory savings (tiled MLP, activation offloading, the CPU fused loss)."""
