"""What runs on the Ray driver: a run's lifecycle (``lifecycle``), its inputs (``prepare``),
the Ray connection (``cluster``), one round's sampling and scheduling (``sampling``,
``rounds``), the aggregation actor (``aggregator``), checkpoints, the files, figures and
console output a run leaves (``outputs``, ``figures``), and sweeps (``grid``, ``sweep``).

Kept import-free: the aggregation actor's process imports ``fedray.driver.aggregator``
and must not pull in the model stack through this package."""
