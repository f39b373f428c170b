"""kohya-ss sd-scripts, as FluxGym launches it: train.sh dialect and rewriting."""
