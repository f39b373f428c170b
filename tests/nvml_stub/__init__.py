"""A fake ``libnvidia-ml.so.1`` whose answers are staged through a state file.

See ``fake_nvml.c`` for the state-file format and ``build.build_fake_nvml`` to compile it.
"""
