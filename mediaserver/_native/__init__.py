"""Compiled kernels built from ``native/*.pyx`` by ``setup.py``.

Nothing here is public: use :mod:`mediaserver.codec`.  If an import from this
package fails, the extensions were not built (run ``make build``); there is
deliberately no pure-Python fallback.
"""
