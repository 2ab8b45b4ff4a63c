"""The daemon face: options, service assembly, signals, reload, workers. Only here the global reactor."""
