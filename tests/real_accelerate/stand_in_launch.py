"""The train.sh that runs the real-accelerate stand-in (sd_trainer.py) as FluxGym runs sd-scripts.

FluxGym's generated train.sh, cut to what the stand-in understands: the same launch line,
the same output flags, the dangling final backslash; the cadence is appended like FluxGym's
advanced options. /app/fluxgym and my-lora are replaced by build_fluxgym_tree. Used by the
real-accelerate tier and by benchmarks/gpu_check.py.
"""

from __future__ import annotations


def fluxgym_train_sh(epochs: int) -> str:
    return (
        "accelerate launch \\\n"
        "  --mixed_precision bf16 \\\n"
        "  --num_cpu_threads_per_process 1 \\\n"
        "  sd-scripts/flux_train_network.py \\\n"
        "  --seed 42 \\\n"
        "  --mixed_precision bf16 \\\n"
        "  --save_model_as safetensors \\\n"
        "  --learning_rate 8e-4 \\\n"
        f"  --max_train_epochs {epochs} \\\n"
        '  --dataset_config "/app/fluxgym/outputs/my-lora/dataset.toml" \\\n'
        '  --output_dir "/app/fluxgym/outputs/my-lora" \\\n'
        "  --output_name my-lora \\\n"
        "  --save_state \\"
    )
