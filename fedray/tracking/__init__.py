"""Where runs are recorded and compared: MLflow (``store``), the names of what runs log
(``names``), live Prometheus metrics (``live_metrics``), statistics over seeds (``stats``,
``comparison``) and reports across runs (``report``)."""
