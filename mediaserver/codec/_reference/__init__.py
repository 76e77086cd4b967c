"""Plain numpy implementations of every kernel, written from the specs.

Used only by the tests and the benches to check the native kernels.  This is
not a run-time fallback: if the compiled kernels are missing, importing
:mod:`mediaserver.codec` fails loudly.
"""
