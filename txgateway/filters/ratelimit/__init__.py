"""The limit filter: token buckets in process or in Redis, the rate_limits: and redis: sections."""
