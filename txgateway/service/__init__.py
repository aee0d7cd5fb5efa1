"""The process: twistd options, wiring a gateway from a config, reload, workers, the CLI, the demo."""
