"""Where runs are recorded and compared: MLflow (``store``), live Prometheus metrics
(``live_metrics``) and reports across runs (``report``)."""
