"""The stages that make an image: the request resolved once (``resolve``), the Dockerfile
rendered (``render``), the build context and its digest (``context``), the build and its
retry ladder (``ladder``), the failure classes that drive it (``failures``), what one run
keeps (``run``) and the offline base image (``baseimage``).

Floor 3 of the worker: imports the foundations and ``caches``; never the pipeline,
``farm``, ``ops`` or ``bench``."""
