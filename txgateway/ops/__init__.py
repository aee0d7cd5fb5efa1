"""What operators see: access log, logs, counters and metrics, admin endpoint, status page, Manhole."""
