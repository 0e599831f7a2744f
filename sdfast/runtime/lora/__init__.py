"""LoRA at run time: LoRA files read with numpy, merged into the engine's weights, and the sessions re-created."""
