"""Operating the farm: metrics (``metrics``), the signal hooks that count and log jobs
(``hooks``), garbage collection of images and tarballs (``gc``) and of the registry
(``registrygc``), and the ``gc`` command (``cli``).

Floor 6 of the worker: may read ``farm`` (job records, keys) and everything below it;
never ``bench`` nor the app (``celery_app``, ``embedded``, ``cli``)."""
