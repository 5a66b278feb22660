"""The caches a build is reused from, below the engine's own images: tarballs pfbuild
saved (``tarball``, whose trust records live in ``trust``) and the shared Docker registry
(``registry``).

Floor 2 of the worker: imports only the worker's foundations (``engine``, ``layout``,
``artifacts``, ``oplog``, ``imagewatch``) and ``pfbuild.client``; never ``build``,
the pipeline, ``farm``, ``ops`` or ``bench``."""
