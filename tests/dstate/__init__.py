"""A tiny shared library that puts its caller into uninterruptible sleep (state D).

See ``dstate.c`` for how, and ``build.build_dstate_library`` to compile it.
"""
