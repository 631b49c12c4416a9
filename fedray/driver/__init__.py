"""What runs on the Ray driver: a run's lifecycle (``lifecycle``), its inputs (``prepare``),
the Ray connection (``cluster``), one round's scheduling (``rounds``), the aggregation actor
(``aggregator``), checkpoints and the files and console output a run leaves (``outputs``).

Kept import-free: the aggregation actor's process imports ``fedray.driver.aggregator``
and must not pull in the model stack through this package."""
