"""The daemon: options and config file, the load step, the service maker and its services."""
