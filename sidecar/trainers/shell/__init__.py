"""A launch script's one trainer command, read the way bash reads it and edited in place.

Every trainer here is started by a shell script (FluxGym's train.sh, the script
``training-sidecar run -- <command>`` writes, a user's own) whose one command is a
launcher (``accelerate launch``, ``python``, ...) and the trainer's arguments. Reading
that command, and adding or replacing one option while leaving every other byte alone,
is the same for every trainer; what the options mean is each trainer's own.
"""
