"""The farm's coordination around one pipeline run: the Celery task (``tasks``), the
per-profile lock with its fence (``lock``), parked lock waits (``lockwait``), a running
job's heartbeat (``liveness``), the result store (``results``), a job's records
(``farmstate``), progress (``progress``), hosts and their engines (``hosts``) and the
hand-back of a job whose engine is down (``handback``).

Floor 5 of the worker: imports the pipeline and everything below it; never ``ops`` or
``bench``, nor the app that wires the farm together (``celery_app``, ``embedded``)."""
